"""The examples the docs site includes, each run as a reader would run it:
``python examples/<file>``, with a proxy on a port of its own.

Which files: every ``.py`` file a page includes (``--8<--``) that no other test runs (see
``tests/support/docs.py``): a new example included by a page is run here without being listed.
Each ends by printing ``... example OK``; some outputs are checked line by line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.docs import run_here
from tests.support.procs import ROOT, kill_tree, pids_alive, python_env, run_example, wait_for

pytestmark = pytest.mark.e2e

# What some examples print, beyond their last line.
PRINTED = {
    "examples/errors.py": [
        "OutOfStock: no unicorn left",
        "not yet",
        "done",
        "cancelled",
        "dropped: Request dropped due to backpressure (num_queued_requests=1, "
        "max_queued_requests=1). Retry later, or raise max_queued_requests of 'narrow.Narrow'.",
        "ok ok",
        "deploy failed",
    ],
    "examples/autoscaling.py": [
        "replicas at start: 0",
        "replicas after one request: 1",
        "replicas under load: 3",
        "replicas when idle: 0",
    ],
}


@pytest.mark.parametrize("path", run_here())
def test_an_example_the_docs_include_runs(path: str, tmp_path: Path) -> None:
    result = run_example(path, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr
    assert lines[-1] == f"{Path(path).stem.replace('_', ' ')} example OK", lines[-1]
    for line in PRINTED.get(path, []):
        assert line in lines, (line, lines)


def test_the_observability_example(tmp_path: Path) -> None:
    """As its docstring says: against `serve start` with tracing on, which serves /metrics."""
    env = python_env(
        SERVE_STATE_DIR=str(tmp_path / "state"),
        SERVE_PROXY_LOCATION="Disabled",
        SERVE_LOG_LEVEL="INFO",  # the default a user has (the tests' is WARNING)
        SERVE_METRICS_INTERVAL_S="0.5",
        SERVE_TRACING_EXPORTER_IMPORT_PATH="serve._tracing:default_tracing_exporter",
        SERVE_TRACING_SAMPLING_RATIO="1.0",
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env
        )

    assert run("-m", "serve", "start").returncode == 0
    pid = json.loads((tmp_path / "state" / "controller.json").read_text())["pid"]
    try:
        result = run("examples/observability.py")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            "['short', 'long', 'short']",
            "classifier_predictions_total label=long 1.0",
            "classifier_predictions_total label=short 2.0",
            "__main__ [<request id>]: classified 2 characters as short",
            result.stdout.splitlines()[4],  # the access line, with its duration
            "spans: ['classify', 'replica_handle_request Classifier __call__']",
            "observability example OK",
        ]
        assert result.stdout.splitlines()[4].startswith("serve.access [<request id>]: __call__ OK")
    finally:
        run("-m", "serve", "shutdown")
        wait_for(lambda: not pids_alive([pid]), timeout_s=30)
        kill_tree(pid)
