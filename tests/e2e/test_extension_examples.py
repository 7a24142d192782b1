"""The extension-point examples (custom router, custom and application-level autoscaling,
rollout knobs) run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import ROOT, kill_tree, pids_alive, python_env, wait_for

pytestmark = pytest.mark.e2e


def run(
    *args: str, env: dict[str, str], timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.parametrize("name", ["custom_router", "custom_autoscaling", "rollout"])
def test_the_extension_examples_run(name: str, tmp_path: Path) -> None:
    result = run(f"examples/{name}.py", env=python_env(SERVE_STATE_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{name.replace('_', ' ')} example OK"


def test_the_application_level_autoscaling_example_deploys(tmp_path: Path) -> None:
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "state"), SERVE_PROXY_LOCATION="Disabled")
    assert run("-m", "serve", "start", env=env).returncode == 0
    pid = json.loads((tmp_path / "state" / "controller.json").read_text())["pid"]
    try:
        deployed = run("-m", "serve", "deploy", "examples/app_autoscaling.yaml", "--wait", env=env)
        assert deployed.returncode == 0, deployed.stderr
        script = "import serve; print(serve.get_app_handle('labels').remote(' Cat ').result())"
        called = run("-c", script, env=env)
        assert called.stdout.strip() == "label(cat)", called.stderr

        def model_replicas() -> int:
            status = json.loads(run("-m", "serve", "status", "--json", env=env).stdout)
            model = status["applications"]["labels"]["deployments"]["Model"]
            return int(model["replica_states"].get("RUNNING", 0))

        assert model_replicas() == 2  # twice the Preprocessor's one replica
        table = run("-m", "serve", "status", env=env).stdout
        assert "labels.Model: autoscaling policy examples.app_autoscaling:coordinated" in table
    finally:
        run("-m", "serve", "shutdown", env=env)
        wait_for(lambda: not pids_alive([pid]), timeout_s=30)
        kill_tree(pid)
