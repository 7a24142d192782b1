"""The state directory is private: directories 0700, files 0600 (constructor args end up in it)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.support.procs import StandaloneController, run_script

pytestmark = pytest.mark.e2e

DRIVER = """
import serve

@serve.deployment
class Keeper:
    def __init__(self, key):
        self.key = key
    def __call__(self):
        return self.key[:3]

assert serve.run(Keeper.bind("sk-live-0123456789"), name="secret").remote().result() == "sk-"
print("ok")
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_directory_logs_and_files_are_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "fresh" / "state"  # neither exists yet: the controller makes them
    controller = StandaloneController(state_dir).start()
    try:
        result = run_script(DRIVER, env=controller.driver_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "ok"
        directories = [state_dir, state_dir / "logs"]
        files = [p for p in state_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        names = {p.name for p in files}
        assert {"token", "controller.json", "controller.log"} <= names, names
        assert any(n.startswith("replica_") for n in names), names
        for directory in directories:
            assert _mode(directory) == 0o700, directory
        for path in files:
            assert _mode(path) == 0o600, (path, oct(_mode(path)))
    finally:
        controller.cleanup()
