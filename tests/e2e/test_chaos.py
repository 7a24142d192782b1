"""scripts/chaos.py: random replicas SIGKILLed under load; only they may fail."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.support.procs import ROOT, python_env

pytestmark = pytest.mark.e2e


def _chaos(seconds: float) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--seconds", str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        cwd=ROOT,
        env=python_env(),
    )
    report: dict[str, object] = json.loads(result.stdout)
    assert result.returncode == 0, (report, result.stderr[-2000:])
    return report


def test_short_chaos_run() -> None:
    report = _chaos(5)
    assert report["failed_otherwise"] == 0
    assert report["leaked_processes"] == []
    assert report["replicas_killed"] >= 3


@pytest.mark.slow
def test_thirty_seconds_of_chaos() -> None:
    report = _chaos(30)
    assert report["failed_otherwise"] == 0
    assert report["leaked_processes"] == []
    assert report["replicas_killed"] >= 20
    assert isinstance(report["succeeded"], int)
    assert report["succeeded"] > 1000
