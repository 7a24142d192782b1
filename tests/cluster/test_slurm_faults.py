"""Faults on a real Slurm cluster: each is survived, callers see only what the failure
semantics allow, and nothing is left behind."""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import pytest

from tests.cluster.conftest import SlurmController
from tests.support.procs import pids_alive, wait_for
from tests.support.slurm_cluster import NODES

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

DRIVER = textwrap.dedent(
    """
    import json, subprocess, time
    import serve
    from serve.exceptions import ReplicaDiedError

    @serve.deployment(  # a kept version: redeploys below scale in place, as in Ray
        version="1", num_replicas=2, health_check_period_s=1, health_check_timeout_s=2,
        graceful_shutdown_timeout_s=2, ray_actor_options={"num_cpus": 1},
    )
    class Where:
        def __call__(self):
            return serve.get_replica_context().node_id

    def jobs():
        out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%N|%j"], capture_output=True,
                             text=True, check=True, timeout=15).stdout
        return sorted(tuple(l.split("|")) for l in out.splitlines() if "serve-" in l)

    def running():
        return sorted((j[0], j[2]) for j in jobs() if j[1] == "RUNNING")

    def calls_until(handle, done, timeout_s=60):
        # Sequential calls until done(); only ReplicaDiedError is an allowed failure.
        died, ok, deadline = 0, 0, time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, "not recovered in time"
            try:
                handle.remote().result(timeout_s=15)
                ok += 1
            except ReplicaDiedError:
                died += 1
        return died, ok
    """
)


def test_a_cancelled_job_is_replaced(slurm_controller: SlurmController) -> None:
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            handle = serve.run(Where.bind(), name="w")
            before = running()
            victim = before[0][0]
            subprocess.run(["scancel", victim], check=True, timeout=15)
            def replaced():
                now = running()
                return len(now) == 2 and victim not in [j for j, _ in now]
            died, ok = calls_until(handle, replaced)
            answers = [handle.remote().result(timeout_s=15) for _ in range(30)]
            print(json.dumps([running(), died, len(answers)]))
            """
        )
    )
    after, died, answered = out
    assert len(after) == 2
    assert died <= 1  # at most the one request in flight on the cancelled replica
    assert answered == 30


def test_a_job_that_fails_before_it_links_fails_the_deploy_with_slurms_reason(
    slurm_controllers: Callable[..., SlurmController],
) -> None:
    # Replicas of this controller exit at once: their environment has a bad setting.
    controller = slurm_controllers("--slurm-option=--export=ALL,SERVE_LOG_FORMAT=bogus")
    out = controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            from serve.exceptions import DeploymentFailedError
            try:
                serve.run(Where.options(num_replicas=1).bind(), name="w")
                print(json.dumps("ran"))
            except DeploymentFailedError as exc:
                print(json.dumps(str(exc)))
            """
        )
    )
    assert "Slurm job" in out, out
    assert "FAILED" in out, out
    assert not controller.jobs()


def test_a_lost_node_is_replaced_on_a_healthy_one(slurm_controller: SlurmController) -> None:
    """Its slurmd dies: Slurm declares the node down and the job NODE_FAIL; the replica, still
    alive there, is told to stop, and its replacement runs on another node."""
    cluster = slurm_controller.cluster
    first = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            handle = serve.run(Where.bind(), name="w")
            print(json.dumps(running()))
            """
        )
    )
    lost_job, lost_node = first[0]
    assert cluster.replica_pids_in(lost_node)
    cluster.kill_slurmd(lost_node)
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            f"""
            handle = serve.get_app_handle("w")
            def replaced():
                now = running()
                return len(now) == 2 and "{lost_job}" not in [j for j, _ in now]
            died, ok = calls_until(handle, replaced, timeout_s=90)
            print(json.dumps([running(), died]))
            """
        ),
        timeout_s=150,
    )
    after, died = out
    assert lost_node not in [node for _, node in after]
    assert died == 0  # the lost replica was still reachable: it drained
    # The replica on the lost node was told to stop when it re-linked: nothing left there.
    wait_for(lambda: not pids_alive(cluster.replica_pids_in(lost_node)), timeout_s=30)


def test_jobs_survive_a_slurmctld_restart(slurm_controller: SlurmController) -> None:
    cluster = slurm_controller.cluster
    before = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            serve.run(Where.bind(), name="w")
            print(json.dumps(running()))
            """
        )
    )
    cluster.restart_slurmctld()
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            handle = serve.get_app_handle("w")
            answers = [handle.remote().result(timeout_s=15) for _ in range(20)]
            handle = serve.run(Where.options(num_replicas=3).bind(), name="w")
            print(json.dumps([len(answers), running()]))
            """
        )
    )
    answered, after = out
    assert answered == 20
    assert len(after) == 3
    assert {tuple(j) for j in before} <= {tuple(j) for j in after}  # the same jobs, one more


def test_a_restarted_controller_re_adopts_replicas_on_every_node(
    slurm_controller: SlurmController,
) -> None:
    before = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            app = Where.options(
                num_replicas=3, max_replicas_per_node=1, ray_actor_options={"num_cpus": 1}
            )
            serve.run(app.bind(), name="w")
            print(json.dumps(running()))
            """
        )
    )
    assert sorted(node for _, node in before) == list(NODES)
    slurm_controller.kill()
    slurm_controller.start()  # same state directory, same address
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            handle = serve.get_app_handle("w")
            deadline = time.monotonic() + 30
            while serve.status().applications["w"].status != "RUNNING":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            nodes = sorted({handle.remote().result(timeout_s=15) for _ in range(60)})
            jobs_now = running()
            serve.shutdown()
            print(json.dumps([jobs_now, nodes]))
            """
        )
    )
    after, nodes = out
    assert after == before  # re-adopted: the same jobs, nothing restarted
    assert nodes == list(NODES)
    wait_for(lambda: not slurm_controller.jobs(), timeout_s=20, interval_s=0.2)
