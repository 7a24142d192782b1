"""TLS on every channel, with a throw-away CA."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from tests.support.procs import StandaloneController, run_script
from tests.support.tls import make_certs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


APP = textwrap.dedent(
    """
    import serve

    @serve.deployment
    class Down:
        def __call__(self, x):
            return x * 2

    @serve.deployment
    class Up:
        def __init__(self, down):
            self._down = down
        async def __call__(self, x):
            return await self._down.remote(x) + 1

    print(serve.run(Up.bind(Down.bind()), name="tls").remote(20).result())
    print(list(serve.status().applications))
    """
)


def test_everything_speaks_tls_and_plaintext_clients_are_refused(tmp_path: Path) -> None:
    tls = make_certs(tmp_path)
    controller = StandaloneController(tmp_path / "state", **tls)
    controller.start()
    try:
        result = run_script(APP, env=controller.driver_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["41", "['tls']"]
        plain = {k: v for k, v in controller.driver_env().items() if not k.startswith("SERVE_TLS")}
        refused = run_script("import serve\nserve.start()\n", timeout_s=60, env=plain)
        assert refused.returncode != 0
        assert "ControllerUnavailableError" in refused.stderr
    finally:
        controller.cleanup()
