"""Custom autoscaling policies through real daemons: a class-based policy driven by a custom
metric, an application-level policy scaling two deployments together, and how their
decisions show in ``serve status`` and the controller's log."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import serve
from serve.schema import ReplicaState
from tests.support.extensions import JobQueue
from tests.support.procs import (
    ROOT,
    StandaloneController,
    python_env,
    running_controller,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _running(app: str, deployment: str) -> int:
    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return status.deployments[deployment].replica_states.get(ReplicaState.RUNNING, 0)


@pytest.mark.usefixtures("serve_instance")
def test_a_class_based_policy_scales_on_a_custom_metric(tmp_path: Path) -> None:
    jobs = tmp_path / "pending_jobs"
    jobs.write_text("0")
    serve.run(JobQueue.bind(str(jobs)), name="jobs", route_prefix=None)
    assert _running("jobs", "JobQueue") == 1
    jobs.write_text("35")  # 35 jobs, 10 per replica: 4 replicas
    wait_for(lambda: _running("jobs", "JobQueue") == 4, timeout_s=60)
    jobs.write_text("12")
    wait_for(lambda: _running("jobs", "JobQueue") == 2, timeout_s=60)
    deployment = serve.status().applications["jobs"].deployments["JobQueue"]
    assert deployment.autoscaling_policy == "tests.support.extensions:MetricPolicy"
    last = deployment.scaling_decisions[0]
    assert (last.curr_num_replicas, last.policy) == (2, "tests.support.extensions:MetricPolicy")
    assert "pending jobs" in last.reason  # the policy's own reason, from its state
    assert any(d.curr_num_replicas == 4 for d in deployment.scaling_decisions)
    # The class was built once (the call count in its state keeps growing).
    calls = [int(d.reason.rsplit("call ", 1)[1].rstrip(")")) for d in deployment.scaling_decisions]
    assert calls == sorted(calls, reverse=True)
    assert len(set(calls)) == len(calls)


def serve_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture
def info_controller(tmp_path: Path) -> Iterator[StandaloneController]:
    """A standalone controller logging at INFO (decisions are INFO lines)."""
    with running_controller(tmp_path / "state", SERVE_LOG_LEVEL="INFO") as controller:
        yield controller


def test_an_application_policy_scales_two_deployments_together(
    info_controller: StandaloneController, tmp_path: Path
) -> None:
    signal_file = tmp_path / "n"
    signal_file.write_text("2")
    config = tmp_path / "app.yaml"
    auto = {"metrics_interval_s": 0.1, "upscale_delay_s": 0, "downscale_delay_s": 0}
    config.write_text(
        yaml.safe_dump(
            {
                "applications": [
                    {
                        "name": "linked",
                        "route_prefix": None,
                        "import_path": "examples.app_autoscaling:app",
                        "autoscaling_policy": {
                            "policy_function": "tests.support.extensions:LinkedPolicy",
                            "policy_kwargs": {"path": str(signal_file)},
                        },
                        "deployments": [
                            {
                                "name": "Preprocessor",
                                "autoscaling_config": {
                                    "min_replicas": 1,
                                    "max_replicas": 4,
                                    **auto,
                                },
                            },
                            {
                                "name": "Model",
                                "autoscaling_config": {
                                    "min_replicas": 1,
                                    "max_replicas": 6,
                                    **auto,
                                },
                            },
                        ],
                    }
                ]
            }
        )
    )
    env = python_env(**info_controller.driver_env())
    deployed = serve_cli("deploy", str(config), "--wait", env=env)
    assert deployed.returncode == 0, deployed.stderr

    def counts() -> tuple[int, int]:
        status = json.loads(serve_cli("status", "--json", env=env).stdout)["applications"]
        deployments = status["linked"]["deployments"]
        return (
            deployments["Preprocessor"]["replica_states"].get("RUNNING", 0),
            deployments["Model"]["replica_states"].get("RUNNING", 0),
        )

    wait_for(lambda: counts() == (2, 4), timeout_s=60)
    signal_file.write_text("3")
    wait_for(lambda: counts() == (3, 6), timeout_s=60)
    signal_file.write_text("1")
    wait_for(lambda: counts() == (1, 2), timeout_s=60)
    table = serve_cli("status", env=env).stdout
    assert (
        "linked.Model: autoscaling policy tests.support.extensions:LinkedPolicy; last decision "
        "6 -> 2 replicas" in table
    ), table
    assert "n=1" in table
    script = "import serve; print(serve.get_app_handle('linked').remote(' HeLLo ').result())"
    called = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert called.stdout.strip() == "label(hello)", called.stderr
    log = (info_controller.state_dir / "logs" / "controller.log").read_text()
    assert (
        "Using custom autoscaling policy 'tests.support.extensions:LinkedPolicy' for "
        "application 'linked'" in log
    )
    assert (
        "Autoscaling linked.Model from 6 to 2 replicas (policy "
        "tests.support.extensions:LinkedPolicy): the policy asked for 2 (n=1)" in log
    )
