"""A real Slurm cluster (three nodes in network namespaces) for this directory's tests.

Skipped, with the reason, where Slurm is not installed or the tests do not run as root;
``make test-cluster`` installs Slurm and runs them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import StandaloneController, kill_tree, python_env, wait_for
from tests.support.slurm_cluster import CONTROLLER_IP, SlurmCluster, unavailable_reason

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with SlurmCluster() as cluster:
        yield cluster


class SlurmController(StandaloneController):
    """A serve-controller on the bridge address that places replicas as Slurm jobs."""

    def __init__(self, state_dir: Path, cluster: SlurmCluster, *args: str, **env: str) -> None:
        super().__init__(
            state_dir,
            "--host",
            CONTROLLER_IP,
            "--launcher",
            "slurm",
            "--slurm-partition",
            "serve",
            "--slurm-poll-s",
            "0.2",
            *args,
            **{"SERVE_ORPHAN_TIMEOUT_S": "30", **cluster.env(), **env},
        )
        self.cluster = cluster

    def drive(self, code: str, timeout_s: float = 90.0, **env: str) -> Any:
        """Run a driver script against this controller; the JSON of its last stdout line."""
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=python_env(**self.driver_env(), **env),
            cwd=self.state_dir.parent,
        )
        assert result.returncode == 0, f"driver failed:\n{result.stdout}\n{result.stderr[-4000:]}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def cluster_head(self) -> str:
        """The node id of the controller's own host (its proxy is the head's)."""
        return socket.gethostname()

    def jobs(self) -> list[tuple[str, str, str, str]]:
        """Replica jobs of this controller: (job id, state, node, name)."""
        return [j for j in self.cluster.squeue() if j[3].startswith("serve-")]


def clean_cluster(cluster: SlurmCluster) -> None:
    """No job left: the next test starts on an idle cluster."""
    cluster.ensure_slurmctld()
    if cluster.squeue():
        subprocess.run(
            ["scancel", "--full", "-u", "root"],
            env={**python_env(), **cluster.env()},
            timeout=15,
            check=False,
        )
    wait_for(lambda: not cluster.squeue(), timeout_s=30, interval_s=0.2)
    cluster.heal()


@pytest.fixture
def slurm_controllers(
    tmp_path: Path, slurm_cluster: SlurmCluster
) -> Iterator[Callable[..., SlurmController]]:
    """Start controllers (extra command-line arguments, env); all are cleaned up after."""
    clean_cluster(slurm_cluster)
    started: list[SlurmController] = []

    def start(*args: str, **env: str) -> SlurmController:
        state_dir = tmp_path / f"state{len(started)}"
        controller = SlurmController(state_dir, slurm_cluster, *args, **env)
        started.append(controller)
        return controller.start()

    try:
        yield start
    finally:
        for controller in started:
            controller.cleanup()  # kills replicas the controller did not get to stop
        for name in slurm_cluster.namespaces:
            for pid in slurm_cluster.replica_pids_in(name):
                kill_tree(pid)
        clean_cluster(slurm_cluster)


@pytest.fixture
def slurm_controller(slurm_controllers: Callable[..., SlurmController]) -> SlurmController:
    return slurm_controllers()
