"""The local launcher honours ray_actor_options: GPUs by CUDA_VISIBLE_DEVICES from a
configured count, an optional CPU capacity, and max_replicas_per_node on this one node."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.procs import StandaloneController, python_env, run_script

pytestmark = pytest.mark.e2e

DRIVER = textwrap.dedent(
    """
    import json, os, time
    import serve

    @serve.deployment(version="1")  # redeploys below scale in place instead of replacing
    class Gpu:
        def __call__(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES")

    def deploy_nowait(app, name):
        target = serve.RunTarget(app, name=name, route_prefix=None)
        serve.run_many([target], wait_for_applications_running=False)

    def wait_message(name, word, timeout_s=20):
        deadline = time.monotonic() + timeout_s
        while True:
            status = serve.status().applications[name]
            message = status.deployments["Gpu"].message
            if word in message or time.monotonic() > deadline:
                return [status.status, message]
            time.sleep(0.05)
    """
)


def test_gpus_are_assigned_and_cpus_capped(tmp_path: Path) -> None:
    controller = StandaloneController(tmp_path / "state", "--num-gpus", "2", "--num-cpus", "3")
    try:
        controller.start()
        result = run_script(
            DRIVER
            + textwrap.dedent(
                """
                app = Gpu.options(num_replicas=2, ray_actor_options={"num_gpus": 1})
                handle = serve.run(app.bind(), name="gpu")
                seen = sorted({handle.remote().result() for _ in range(40)})
                # A third GPU replica: no GPU left, so it waits and says why.
                deploy_nowait(app.options(num_replicas=3).bind(), "gpu")
                gpu_wait = wait_message("gpu", "pending")
                # CPUs: 3 in all, two held; one more 2-CPU replica cannot start.
                deploy_nowait(Gpu.options(ray_actor_options={"num_cpus": 2}).bind(), "cpu")
                cpu_wait = wait_message("cpu", "pending")
                serve.delete("gpu")  # frees GPUs and CPUs: the CPU replica starts
                handle = serve.get_app_handle("cpu")
                print(json.dumps([seen, gpu_wait, cpu_wait, handle.remote().result()]))
                """
            ),
            env=controller.driver_env(),
        )
        assert result.returncode == 0, result.stderr
        seen, gpu_wait, cpu_wait, cpu_answer = json.loads(result.stdout.splitlines()[-1])
        assert seen == ["0", "1"]
        assert gpu_wait[0] == "DEPLOYING"
        assert "1 replica(s) pending" in gpu_wait[1]
        assert "needs 1 GPU(s); 0 of 2 free" in gpu_wait[1]
        assert "needs 2 CPU(s); 1 of 3 free" in cpu_wait[1]
        assert cpu_answer == ""  # GPUs are managed: a replica without one sees none
    finally:
        controller.cleanup()


def test_max_replicas_per_node_holds_back_replicas_on_one_host(tmp_path: Path) -> None:
    controller = StandaloneController(tmp_path / "state")
    try:
        controller.start()
        result = run_script(
            DRIVER
            + textwrap.dedent(
                """
                deploy_nowait(Gpu.options(num_replicas=2, max_replicas_per_node=1).bind(), "one")
                print(json.dumps(wait_message("one", "pending")))
                """
            ),
            env=controller.driver_env(),
        )
        assert result.returncode == 0, result.stderr
        status, message = json.loads(result.stdout.splitlines()[-1])
        assert "max_replicas_per_node=1 reached on this node" in message
        assert status == "DEPLOYING"
    finally:
        controller.cleanup()


def test_a_config_file_sets_the_controller_options(tmp_path: Path) -> None:
    """`serve-controller --config FILE` takes the same options as its flags; flags win."""
    config = tmp_path / "controller.yaml"
    config.write_text("num_cpus: 5\nlauncher: local\nproxy_location: Disabled\n")
    controller = StandaloneController(
        tmp_path / "state", "--config", str(config), "--num-cpus", "1"
    )
    try:
        controller.start()
        result = run_script(
            DRIVER
            + textwrap.dedent(
                """
                deploy_nowait(Gpu.options(num_replicas=2).bind(), "cpu")
                print(json.dumps(wait_message("cpu", "pending")))
                """
            ),
            env=controller.driver_env(),
        )
        assert result.returncode == 0, result.stderr
        status, message = json.loads(result.stdout.splitlines()[-1])
        assert status == "DEPLOYING"
        assert "needs 1 CPU(s); 0 of 1 free" in message  # the flag's num_cpus, not the file's
        assert controller.proxy_pids() == []  # proxy_location from the file
    finally:
        controller.cleanup()


def test_a_bad_config_file_is_refused_with_its_name_and_key(tmp_path: Path) -> None:
    config = tmp_path / "controller.yaml"

    def start_with(text: str) -> subprocess.CompletedProcess[str]:
        config.write_text(text)
        return subprocess.run(
            [sys.executable, "-m", "controller", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=python_env(),
        )

    bad = start_with("launcher: kubernetes\n")
    assert bad.returncode == 2
    assert f"--config {config}: launcher: expected one of local, slurm" in bad.stderr
    typo = start_with("slurm_partitions: serve\n")
    assert typo.returncode == 2
    assert "unknown option 'slurm_partitions'" in typo.stderr
