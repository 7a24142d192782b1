"""Ray Serve's own documentation examples, changed only in their import (examples/*_guide.py),
each run as a new user would: ``python examples/<file>``, serving HTTP on a port of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.procs import run_example

pytestmark = pytest.mark.e2e


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def test_the_batching_guide_runs(tmp_path: Path) -> None:
    result = run_example("examples/batching_guide.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Results: [10.0, 500.0, 300.0]" in result.stdout  # batch_size_fn, by node count
    assert "Token counts: [5, 12, 1]" in result.stdout  # batch_size_fn, by token count
    assert last_line(result) == "Batching guide OK"


def test_the_multiplexing_guide_runs(tmp_path: Path) -> None:
    result = run_example("examples/multiplexing_guide.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Composition: bar" in result.stdout  # the model id set on the downstream call
    assert last_line(result) == "Multiplexing guide OK"


def test_the_app_builder_guide_runs(tmp_path: Path) -> None:
    result = run_example("examples/app_builder_guide.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert last_line(result) == "App builder guide OK"


def test_the_streaming_guide_runs(tmp_path: Path) -> None:
    result = run_example("examples/streaming_guide.py", tmp_path)
    assert result.returncode == 0, result.stderr
    # The driver printed each chunk as it came, and disconnected after the eleventh.
    assert "after start: '9'" in result.stdout
    assert "Client disconnecting" in result.stdout
    assert last_line(result) == "Streaming guide OK"
