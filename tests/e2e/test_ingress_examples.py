"""The ingress examples run as a user would run them: gRPC (the four kinds of method, the
call's context, RayServeAPIService), HTTPS, and load shedding with BackpressureConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.procs import free_port, run_example

pytestmark = pytest.mark.e2e


def test_the_grpc_example(tmp_path: Path) -> None:
    result = run_example(
        "examples/grpc_service.py", tmp_path, SERVE_DEFAULT_GRPC_PORT=str(free_port())
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "applications: ['greeter']",
        "healthz: success",
        "Hello Bob, from ada's call serve",
        "refused: INVALID_ARGUMENT name is required",
        "['n 1', 'n 2', 'n 3']",
        "ham & eggs & spam",
        "chat: stressed -> desserts",
        "chat: drawer -> reward",
    ]


def test_the_https_example(tmp_path: Path) -> None:
    result = run_example("examples/https.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Hello over https!"


def test_the_load_shedding_example(tmp_path: Path) -> None:
    result = run_example("examples/load_shedding.py", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[:2] == ["200 - done", "200 - done"]
    for line in lines[2:]:
        assert line.startswith("429 2 Request dropped due to backpressure"), line
    assert len(lines) == 4
