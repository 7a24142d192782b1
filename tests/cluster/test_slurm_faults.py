"""Faults on a real Slurm cluster: each is survived, callers see only what the failure
semantics allow, and nothing is left behind."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable

import pytest

from serve._settings import settings
from tests.cluster.conftest import SlurmController
from tests.support.procs import pids_alive, wait_for
from tests.support.slurm_cluster import NODES

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

OUTAGE_S = 12.0
CUT_ORPHAN_TIMEOUT_S = 6.0

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

    def deploy_nowait(app, name):
        target = serve.RunTarget(app, name=name, route_prefix=None)
        serve.run_many([target], wait_for_applications_running=False)

    def message(name):
        return serve.status().applications[name].deployments["Where"].message

    def wait_running(name, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while serve.status().applications[name].status != "RUNNING":
            assert time.monotonic() < deadline, serve.status().applications[name]
            time.sleep(0.2)

    def replaced_off(lost, timeout_s=90):
        # Calls until two replicas run again, none on the node (or in the job) that was lost.
        def replaced():
            now = running()
            return len(now) == 2 and lost not in [x for job in now for x in job]
        handle = serve.get_app_handle("w")
        return calls_until(handle, replaced, timeout_s=timeout_s)

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
            died, ok = replaced_off(victim, timeout_s=60)
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


def test_a_constructor_that_fails_on_one_node_is_placed_elsewhere(
    slurm_controller: SlurmController,
) -> None:
    """Three 1-CPU replicas land on n1, n1 and n2; the constructor fails on n2 only. After two
    failures there n2 is avoided (--exclude) and the third replica runs on n3: the deploy
    completes instead of resubmitting to n2 forever."""
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            @serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 1})
            class Picky:
                def __init__(self):
                    if serve.get_replica_context().node_id == "n2":
                        raise RuntimeError("no GPU driver on n2")
                def __call__(self):
                    return serve.get_replica_context().node_id

            handle = serve.run(Picky.bind(), name="picky")
            print(json.dumps(sorted({handle.remote().result() for _ in range(60)})))
            """
        ),
    )
    assert "n2" not in out
    assert len(out) >= 2
    ours = [
        job
        for job in slurm_controller.cluster.all_jobs().values()
        if job["JobName"].startswith("serve-") and "Picky" in job["JobName"]
    ]
    on_n2 = [job for job in ours if job.get("NodeList") == "n2"]
    assert len(on_n2) == 2, on_n2  # NODE_FAILURES_TO_AVOID, then never again


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
            died, ok = replaced_off("{lost_job}")
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


def test_a_replica_cut_off_by_the_network_exits_within_the_orphan_timeout(
    slurm_controllers: Callable[..., SlurmController],
) -> None:
    """A node's link goes down (packets lost, nothing closed): its replica hears no heartbeat
    for SERVE_HEARTBEAT_TIMEOUT_S, starts its orphan clock then and exits after
    SERVE_ORPHAN_TIMEOUT_S, before Slurm gives up on the node; the replacement serves."""
    controller = slurm_controllers(SERVE_ORPHAN_TIMEOUT_S=str(CUT_ORPHAN_TIMEOUT_S))
    cluster = controller.cluster
    first = controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            app = Where.options(max_replicas_per_node=1)
            serve.run(app.bind(), name="w")
            print(json.dumps(running()))
            """
        )
    )
    cut_job, cut_node = first[0]
    assert cluster.replica_pids_in(cut_node)
    (cut_replica,) = [
        name.split(":", 1)[1] for job, _, _, name in controller.jobs() if job == cut_job
    ]
    cluster.cut_network(cut_node)
    cut_at = time.monotonic()
    job_gone_s = 0.0
    while cluster.replica_pids_in(cut_node):
        assert time.monotonic() - cut_at < 60, "the cut-off replica runs on"
        if not job_gone_s and cut_job not in [j[0] for j in controller.jobs() if j[1] == "RUNNING"]:
            job_gone_s = time.monotonic() - cut_at
        time.sleep(0.2)
    gone_s = time.monotonic() - cut_at
    print(f"replica gone {gone_s:.1f}s after the cut; Slurm dropped its job at {job_gone_s:.1f}s")
    assert gone_s < CUT_ORPHAN_TIMEOUT_S + settings().heartbeat_timeout_s + 6, gone_s
    log = controller.state_dir / "logs" / "controller.log"
    assert f"Replica {cut_replica} said nothing" in log.read_text()  # the controller knew too
    out = controller.drive(
        DRIVER
        + textwrap.dedent(
            f"""
            died, ok = replaced_off("{cut_node}")
            print(json.dumps(running()))
            """
        ),
        timeout_s=150,
    )
    assert cut_node not in [node for _, node in out]


def test_slurmctld_down_during_traffic_and_a_deploy_is_ridden_out(
    slurm_controller: SlurmController,
) -> None:
    """slurmctld stops: traffic goes on, a deploy made meanwhile waits (sbatch fails at once,
    "Unable to contact slurm controller"; nothing is counted as a replica failure) and completes
    once slurmctld is back, with the jobs that ran before still running."""
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
    cluster.stop_slurmctld()
    down_at = time.monotonic()
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            handle = serve.get_app_handle("w")
            answers = [handle.remote().result(timeout_s=15) for _ in range(20)]
            deploy_nowait(Where.options(num_replicas=3).bind(), "w")
            deadline = time.monotonic() + 30
            while "Slurm is unreachable" not in message("w"):
                assert time.monotonic() < deadline, message("w")
                time.sleep(0.2)
            print(json.dumps([len(answers), message("w")]))
            """
        )
    )
    answered, waiting = out
    assert answered == 20
    assert "Unable to contact slurm controller" in waiting, waiting
    # Longer than the old controller took to give up for good (about 10 s, 11 sbatch calls).
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    status = slurm_controller.drive(
        DRIVER + "\nprint(json.dumps(serve.status().applications['w'].status))\n"
    )
    assert status == "DEPLOYING"
    cluster.start_slurmctld()
    out = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            wait_running("w")
            handle = serve.get_app_handle("w")
            nodes = {handle.remote().result(timeout_s=15) for _ in range(30)}
            print(json.dumps([running(), message("w")]))
            """
        )
    )
    after, settled = out
    assert len(after) == 3
    assert {tuple(j) for j in before} <= {tuple(j) for j in after}  # the same jobs, one more
    assert "failure" not in settled


def test_a_restarted_controller_re_adopts_replicas_and_keeps_spreading_them(
    slurm_controller: SlurmController,
) -> None:
    """The same jobs come back under the new controller, with their resource requests: scaling
    3 -> 4 with max_replicas_per_node=1 on three nodes holds the fourth back."""
    before = slurm_controller.drive(
        DRIVER
        + textwrap.dedent(
            """
            app = Where.options(
                num_replicas=3, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5}
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
            wait_running("w", timeout_s=30)
            nodes = sorted({handle.remote().result(timeout_s=15) for _ in range(60)})
            jobs_now = running()
            app = Where.options(
                num_replicas=4, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5}
            )
            deploy_nowait(app.bind(), "w")
            deadline = time.monotonic() + 30
            while "pending" not in message("w"):
                assert time.monotonic() < deadline, message("w")
                time.sleep(0.2)
            time.sleep(1.0)  # a few polls: nothing more is placed
            print(json.dumps([jobs_now, nodes, message("w"), running()]))
            serve.shutdown()
            """
        )
    )
    after, nodes, pending, spread = out
    assert after == before  # re-adopted: the same jobs, nothing restarted
    assert nodes == list(NODES)
    assert "every node (3) already runs 1 replica(s)" in pending, pending
    assert sorted(node for _, node in spread) == list(NODES)  # never two on one node
    wait_for(lambda: not slurm_controller.jobs(), timeout_s=20, interval_s=0.2)


def test_a_controller_killed_right_after_serve_run_keeps_every_replica(
    slurm_controllers: Callable[..., SlurmController],
) -> None:
    """Each replica is in the state database before it is launched, so serve.run can never
    count one the next controller would not know: killed at once, restarted, nothing is
    cancelled or submitted again. (A slow poll: replicas link and run before it sees their
    jobs RUNNING, the window in which one used to be known only in memory.)"""
    slurm_controller = slurm_controllers("--slurm-poll-s", "2")
    assert slurm_controller.process is not None
    for version in ("1", "2"):  # the second round replaces every replica of the first
        first = slurm_controller.drive(
            DRIVER
            + textwrap.dedent(
                f"""
                import os, signal
                serve.run(Where.options(num_replicas=3, version="{version}").bind(), name="w")
                os.kill({slurm_controller.process.pid}, signal.SIGKILL)
                print(json.dumps(running()))
                """
            )
        )
        slurm_controller.kill()  # reaped (it is gone already)
        submitted = slurm_controller.cluster.all_job_ids()
        slurm_controller.start()
        out = slurm_controller.drive(
            DRIVER
            + textwrap.dedent(
                """
                wait_running("w", timeout_s=30)
                time.sleep(1.0)  # a few polls: a replica wrongly replaced would show by now
                print(json.dumps(running()))
                """
            )
        )
        # The same jobs (an old version's job may still have been ending in the first list).
        assert len(out) == 3
        assert {tuple(j) for j in out} <= {tuple(j) for j in first}, f"{first} -> {out}"
        assert slurm_controller.cluster.all_job_ids() == submitted  # nothing submitted again
