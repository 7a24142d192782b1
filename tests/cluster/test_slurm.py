"""Replicas placed by a real Slurm cluster: three nodes, each its own network namespace and IP.

Every test drives a ``serve-controller --launcher slurm`` bound to the bridge address; replicas
are Slurm jobs that bind their node's address, so every request crosses real routing.
"""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.cluster.conftest import SlurmController
from tests.support.procs import run_script, wait_for
from tests.support.slurm_cluster import CONTROLLER_IP, NODES, SlurmCluster
from tests.support.tls import make_certs

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

WHERE = textwrap.dedent(
    """
    import json, os, socket
    import serve

    @serve.deployment(version="1")  # a kept version: redeploys below scale in place, as in Ray
    class Where:
        def __call__(self):
            return serve.get_replica_context().node_id

    def deploy_nowait(app, name):
        target = serve.RunTarget(app, name=name, route_prefix=None)
        serve.run_many([target], wait_for_applications_running=False)

    def message(name, deployment):
        return serve.status().applications[name].deployments[deployment].message

    def nodes_of(handle, calls=60):
        return sorted({handle.remote().result() for _ in range(calls)})
    """
)


def running_nodes(controller: SlurmController) -> list[str]:
    return sorted(node for _, state, node, _ in controller.jobs() if state == "RUNNING")


def test_replicas_are_placed_by_cpus_and_the_one_that_does_not_fit_says_why(
    slurm_controller: SlurmController,
) -> None:
    """Two CPUs a replica on two-CPU nodes: one per node; a fourth waits for room."""
    nodes = slurm_controller.drive(
        WHERE
        + textwrap.dedent(
            """
            app = Where.options(num_replicas=3, ray_actor_options={"num_cpus": 2})
            handle = serve.run(app.bind(), name="where")
            print(json.dumps(nodes_of(handle)))
            """
        )
    )
    assert nodes == list(NODES)
    assert running_nodes(slurm_controller) == list(NODES)
    assert_token_is_private(slurm_controller)
    message = slurm_controller.drive(
        WHERE
        + textwrap.dedent(
            """
            import time
            app = Where.options(num_replicas=4, ray_actor_options={"num_cpus": 2})
            deploy_nowait(app.bind(), "where")
            deadline = time.monotonic() + 30
            while "pending" not in message("where", "Where") and time.monotonic() < deadline:
                time.sleep(0.1)
            print(json.dumps(message("where", "Where")))
            """
        )
    )
    assert "1 replica(s) pending" in message
    assert '{"CPU": 2.0}' in message, message
    assert "(Resources)" in message, message


def assert_token_is_private(controller: SlurmController) -> None:
    """The cluster token is in no command line and no job record Slurm shows."""
    token = (controller.state_dir / "token").read_text().strip()
    assert token
    pids = controller.replica_pids()
    assert pids
    for pid in pids:
        assert token not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    for job_id, *_ in controller.jobs():
        shown = controller.cluster.scontrol("-o", "show", "job", "-d", job_id).stdout
        assert "JobState=RUNNING" in shown
        assert token not in shown
        script = controller.cluster.scontrol("write", "batch_script", job_id, "-").stdout
        assert "-m replica" in script
        assert token not in script


def test_a_replica_no_node_can_hold_stays_pending_with_the_reason(
    slurm_controller: SlurmController,
) -> None:
    status = slurm_controller.drive(
        WHERE
        + textwrap.dedent(
            """
            import time
            deploy_nowait(Where.options(ray_actor_options={"num_cpus": 4}).bind(), "big")
            deadline = time.monotonic() + 30
            while "pending" not in message("big", "Where") and time.monotonic() < deadline:
                time.sleep(0.1)
            app = serve.status().applications["big"]
            print(json.dumps([app.status, message("big", "Where")]))
            """
        )
    )
    assert status[0] == "DEPLOYING"
    assert "Slurm cannot place" in status[1], status
    assert '{"CPU": 4.0}' in status[1], status
    assert "Requested node configuration is not available" in status[1]
    assert not slurm_controller.jobs()


def test_max_replicas_per_node_spreads_replicas_and_holds_back_the_extra_one(
    slurm_controller: SlurmController,
) -> None:
    result = slurm_controller.drive(
        WHERE
        + textwrap.dedent(
            """
            import time
            app = Where.options(
                num_replicas=3, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5}
            )
            handle = serve.run(app.bind(), name="spread")
            nodes = nodes_of(handle)
            deploy_nowait(app.options(num_replicas=4).bind(), "spread")
            deadline = time.monotonic() + 30
            while "pending" not in message("spread", "Where") and time.monotonic() < deadline:
                time.sleep(0.1)
            print(json.dumps([nodes, message("spread", "Where")]))
            """
        )
    )
    nodes, message = result
    assert nodes == list(NODES)
    assert "every node (3) already runs 1 replica(s) of this deployment" in message, message
    assert running_nodes(slurm_controller) == list(NODES)


COMPOSED = textwrap.dedent(
    """
    import json
    import serve

    @serve.deployment(ray_actor_options={"num_cpus": 2})
    class Down:
        def __call__(self, x):
            return {"node": serve.get_replica_context().node_id, "x": x * 2}

    @serve.deployment(ray_actor_options={"num_cpus": 2})
    class Ingress:
        def __init__(self, down):
            self.down = down
        async def __call__(self, x):
            below = await self.down.remote(x)
            return {"node": serve.get_replica_context().node_id, "down": below}
    """
)


def test_composition_across_nodes(slurm_controller: SlurmController) -> None:
    out = slurm_controller.drive(
        COMPOSED
        + textwrap.dedent(
            """
            handle = serve.run(Ingress.bind(Down.bind()), name="composed")
            out = [handle.remote(i).result() for i in range(5)]
            # Big buffers (out of band; through /dev/shm where the ends share one) both ways.
            big = handle.remote(bytes(range(256)) * 8192).result()
            assert big["down"]["x"] == bytes(range(256)) * 16384, len(big["down"]["x"])
            print(json.dumps(out))
            """
        )
    )
    assert [o["down"]["x"] for o in out] == [0, 2, 4, 6, 8]
    ingress_node, down_node = out[0]["node"], out[0]["down"]["node"]
    assert {ingress_node, down_node} <= set(NODES)
    assert ingress_node != down_node


def test_prefer_local_routing_chooses_the_callers_node(slurm_controller: SlurmController) -> None:
    out = slurm_controller.drive(
        textwrap.dedent(
            """
            import json
            import serve

            @serve.deployment(
                num_replicas=3, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5}
            )
            class Down:
                def __call__(self):
                    return serve.get_replica_context().node_id

            @serve.deployment(ray_actor_options={"num_cpus": 0.5})
            class Ingress:
                def __init__(self, down):
                    self.local = down.options(_prefer_local_routing=True)
                    self.any = down
                async def __call__(self):
                    me = serve.get_replica_context().node_id
                    local = {await self.local.remote() for _ in range(30)}
                    anywhere = {await self.any.remote() for _ in range(60)}
                    return [me, sorted(local), sorted(anywhere)]

            handle = serve.run(Ingress.bind(Down.bind()), name="local")
            print(json.dumps(handle.remote().result()))
            """
        )
    )
    me, local, anywhere = out
    assert local == [me]
    assert anywhere == list(NODES)


def test_serve_shutdown_leaves_no_job_behind(slurm_controller: SlurmController) -> None:
    slurm_controller.drive(
        WHERE
        + textwrap.dedent(
            """
            app = Where.options(num_replicas=3, ray_actor_options={"num_cpus": 1})
            serve.run(app.bind(), name="where")
            serve.shutdown()
            print(json.dumps(True))
            """
        )
    )
    wait_for(lambda: not slurm_controller.jobs(), timeout_s=20, interval_s=0.2)
    assert slurm_controller.process is not None
    assert slurm_controller.process.wait(20) == 0
    assert not slurm_controller.replica_pids()


def test_the_controller_advertises_the_bridge_address(slurm_controller: SlurmController) -> None:
    assert slurm_controller.address.startswith(f"{CONTROLLER_IP}:")


def test_tls_across_nodes(
    tmp_path: Path, slurm_controllers: Callable[..., SlurmController], slurm_cluster: SlurmCluster
) -> None:
    """Mutual TLS on every channel: driver -> controller, driver -> replicas on two nodes,
    replica -> replica across nodes; a plaintext driver is refused."""
    tls = make_certs(tmp_path, ips=(CONTROLLER_IP, *slurm_cluster.node_ips.values()))
    controller = slurm_controllers(**tls)
    out = controller.drive(
        COMPOSED
        + textwrap.dedent(
            """
            handle = serve.run(Ingress.bind(Down.bind()), name="tls")
            print(json.dumps(handle.remote(20).result()))
            """
        )
    )
    assert out["down"]["x"] == 40
    assert out["node"] != out["down"]["node"]
    plain = {k: v for k, v in controller.driver_env().items() if not k.startswith("SERVE_TLS")}
    refused = run_script("import serve\nserve.start()\n", timeout_s=60, env=plain)
    assert refused.returncode != 0
    assert "ControllerUnavailableError" in refused.stderr


EVERY_NODE = textwrap.dedent(
    """
    import json, time
    import serve

    @serve.deployment(
        version="1", max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5}
    )
    class WhereHttp:
        def __call__(self, request):
            return serve.get_replica_context().node_id

    def proxies_once(count):
        deadline = time.monotonic() + 60
        while True:
            details = serve.status().proxy_details
            healthy = {n: d.http_address for n, d in details.items() if d.status == "HEALTHY"}
            if len(details) == count and len(healthy) == count:
                return healthy
            assert time.monotonic() < deadline, details
            time.sleep(0.2)
    """
)


def test_every_node_with_replicas_runs_a_proxy_that_answers_on_its_address(
    slurm_controllers: Callable[..., SlurmController], slurm_cluster: SlurmCluster
) -> None:
    """EveryNode: a proxy job on each node that runs replicas (besides the controller's own),
    answering HTTP on the node's address and preferring the node's replica; a node's proxy
    goes with its last replica, and `serve shutdown` leaves no proxy job."""
    controller = slurm_controllers(
        "--proxy-location", "EveryNode", "--http-host", "0.0.0.0", "--http-port", "0"
    )
    proxies = controller.drive(
        EVERY_NODE
        + textwrap.dedent(
            """
            serve.run(WhereHttp.options(num_replicas=3).bind(), name="w", route_prefix="/w")
            print(json.dumps(proxies_once(4)))
            """
        )
    )
    assert set(proxies) == {*NODES, controller.cluster_head()}
    for node in NODES:
        address = proxies[node]
        assert address.startswith(f"{slurm_cluster.node_ips[node]}:"), proxies
        answers = {httpx.get(f"http://{address}/w", timeout=30).text for _ in range(5)}
        assert answers == {node}  # served on the node: its proxy prefers its replica
    proxy_jobs = [j for j in controller.jobs() if ":proxy:" in j[3]]
    assert sorted(j[2] for j in proxy_jobs if j[1] == "RUNNING") == list(NODES)
    left = controller.drive(
        EVERY_NODE
        + textwrap.dedent(
            """
            serve.run(WhereHttp.options(num_replicas=1).bind(), name="w", route_prefix="/w")
            print(json.dumps(proxies_once(2)))
            """
        )
    )
    (node,) = set(left) - {controller.cluster_head()}
    wait_for(
        lambda: [j[2] for j in controller.jobs() if ":proxy:" in j[3]] == [node],
        timeout_s=30,
        interval_s=0.2,
    )
    controller.drive(EVERY_NODE + "\nserve.status()\nserve.shutdown()\nprint(json.dumps(True))\n")
    wait_for(lambda: not controller.jobs(), timeout_s=30, interval_s=0.2)


GANG = textwrap.dedent(
    """
    import json, os, time
    import serve
    from serve.config import GangPlacementStrategy, GangSchedulingConfig

    @serve.deployment(
        num_replicas=3,
        ray_actor_options={"num_cpus": 1},
        gang_scheduling_config=GangSchedulingConfig(
            gang_size=3, gang_placement_strategy=GangPlacementStrategy.SPREAD
        ),
    )
    class Member:
        def __call__(self):
            context = serve.get_replica_context()
            gang = context.gang_context
            return [context.node_id, context.replica_tag, gang.gang_id, gang.rank,
                    gang.world_size, gang.member_replica_ids, gang.pg_name]

    def members(handle):
        seen, deadline = {}, time.monotonic() + 60
        while len(seen) < 3:
            assert time.monotonic() < deadline, seen
            answer = handle.remote().result(timeout_s=30)
            seen[answer[1]] = answer
        return sorted(seen.values(), key=lambda a: a[3])
    """
)


def test_a_gang_of_three_is_one_job_across_nodes_restarts_whole_and_is_readopted(
    slurm_controller: SlurmController,
) -> None:
    """gang_size=3, SPREAD: one Slurm job of three tasks, one per node; every member sees the
    gang (ranks 0-2, the same members). One member killed ends the job; a new gang runs. A
    restarted controller re-adopts the gang as it is."""
    first = slurm_controller.drive(
        GANG
        + textwrap.dedent(
            """
            handle = serve.run(Member.bind(), name="gang")
            print(json.dumps(members(handle)))
            """
        )
    )
    assert sorted(m[0] for m in first) == list(NODES)  # spread: a member on every node
    assert [m[3] for m in first] == [0, 1, 2]
    assert {m[4] for m in first} == {3}
    assert len({m[2] for m in first}) == 1  # one gang
    assert all(m[5] == [f[1] for f in first] for m in first)  # members by rank, everywhere
    jobs = slurm_controller.jobs()
    assert len(jobs) == 1  # the gang is one job
    assert first[0][6] == jobs[0][3]  # pg_name: that job
    victim_node = first[1][0]
    (victim,) = slurm_controller.cluster.replica_pids_in(victim_node)
    os.kill(victim, signal.SIGKILL)
    second = slurm_controller.drive(
        GANG
        + textwrap.dedent(
            f"""
            handle = serve.get_app_handle("gang")
            deadline = time.monotonic() + 60
            while True:
                now = members(handle)
                if len({{m[2] for m in now}}) == 1 and now[0][2] != "{first[0][2]}":
                    break
                assert time.monotonic() < deadline, now
                time.sleep(0.2)
            print(json.dumps(now))
            """
        )
    )
    assert not {m[1] for m in second} & {m[1] for m in first}  # every member is new
    assert sorted(m[0] for m in second) == list(NODES)
    wait_for(lambda: len(slurm_controller.jobs()) == 1, timeout_s=30, interval_s=0.2)
    job = slurm_controller.jobs()
    slurm_controller.kill()  # a restarted controller re-adopts the gang, whole
    slurm_controller.start()
    third = slurm_controller.drive(
        GANG
        + textwrap.dedent(
            """
            deadline = time.monotonic() + 30
            while serve.status().applications["gang"].status != "RUNNING":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            time.sleep(1.0)  # a few polls: a gang wrongly restarted would show by now
            print(json.dumps(members(serve.get_app_handle("gang"))))
            """
        )
    )
    assert third == second
    assert slurm_controller.jobs() == job
