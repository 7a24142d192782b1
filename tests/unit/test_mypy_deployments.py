"""The mypy plugin `make lint` uses (scripts/mypy_deployments.py): a ``@serve.deployment``
class gets ``Deployment``'s members, typed, and nothing else."""

from __future__ import annotations

import textwrap
from pathlib import Path

from mypy import api

from tests.support.procs import ROOT

PROGRAM = """
import serve

@serve.deployment
class Bare:
    def __call__(self) -> int:
        return 1

@serve.deployment(num_replicas=2)
class WithOptions:
    pass

reveal_type(Bare.bind())
reveal_type(WithOptions.options(name="w").bind())
reveal_type(Bare.func_or_class)
reveal_type(Bare.name)
Bare.no_such_member
"""


def test_a_deployment_class_has_deployment_members_and_no_others(tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(textwrap.dedent(PROGRAM))
    config = tmp_path / "mypy.ini"
    plugin = ROOT / "scripts" / "mypy_deployments.py"
    config.write_text(f"[mypy]\nstrict = True\nplugins = {plugin}\n")
    out, err, _ = api.run(
        [
            "--config-file",
            str(config),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-incremental",
            str(program),
        ]
    )
    lines = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith(str(program))]
    assert lines == [
        'note: Revealed type is "serve._deployment.Application"',
        'note: Revealed type is "serve._deployment.Application"',
        'note: Revealed type is "def (*Any, **Any) -> program.Bare"',
        'note: Revealed type is "str"',
        'error: "type[Bare]" has no attribute "no_such_member"  [attr-defined]',
    ], out + err
