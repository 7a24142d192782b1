"""The controller's state machine, driven by events alone: no processes, no sockets, no clock."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from controller import events as ev
from controller.goals import NODE_AVOID_S, whole_gangs
from controller.health import UNHEALTHY_AFTER
from controller.machine import RECOVERY_WAIT_S, ControllerMachine
from controller.state import Phase
from controller.views import replica_sets
from serve._models import (
    ApplicationStatus,
    CodeEnv,
    DeploymentConfig,
    DeploymentID,
    DeploymentSpec,
    DeploymentStatus,
    Failure,
)
from serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

APP = "app"
DEP = DeploymentID("Model", APP)


def spec(version: str = "v1", **config: Any) -> DeploymentSpec:
    config.setdefault("num_replicas", 2)
    return DeploymentSpec("Model", b"code", b"args", version, DeploymentConfig(**config))


def of(actions: Sequence[ev.Action], kind: type[Any]) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


class Harness:
    """A machine plus the bookkeeping a supervisor would do, with a hand-moved clock."""

    def __init__(self) -> None:
        counter = itertools.count(1)
        self.machine = ControllerMachine(
            new_replica_id=lambda d: f"{d.app_name}#{d.name}#r{next(counter)}"
        )
        self.now = 100.0
        self.pids = itertools.count(1000)

    def feed(self, event: ev.Event) -> list[ev.Action]:
        return self.machine.handle(event, self.now)

    def deploy(self, *specs: DeploymentSpec) -> list[ev.Action]:
        return self.feed(ev.AppDeployed(APP, None, specs[0].name, specs, CodeEnv("/", ()), 0.0))

    def bring_up(
        self, replica_id: str, failure: Failure | None = None, host: str = "h"
    ) -> list[ev.Action]:
        """Launched, linked (from ``host``), then its Initialize call's outcome."""
        actions = self.feed(ev.ReplicaLaunched(replica_id, next(self.pids)))
        record = self.machine.replicas[replica_id]
        actions += self.feed(
            ev.ReplicaLinked(
                replica_id, f"127.0.0.1:{record.pid}", record.pid, host, False, "", b""
            )
        )
        assert of(actions, ev.Initialize)
        return actions + self.feed(ev.CallDone(replica_id, ev.Call.INITIALIZE, failure))

    def running(self) -> list[str]:
        return sorted(
            r.replica_id for r in self.machine.replicas.values() if r.phase is Phase.RUNNING
        )

    def routable(self) -> int:
        return len(replica_sets(self.machine.goals(), self.machine.replicas.values())[DEP].replicas)

    def status(self) -> tuple[ApplicationStatus, str]:
        return self.machine.app_status(self.machine.apps[APP])

    def deployment_status(self) -> DeploymentStatus:
        return self.machine.deployment_views(self.machine.apps[APP])["Model"].status


def launched(actions: Sequence[ev.Action]) -> list[str]:
    return [a.replica_id for a in of(actions, ev.Launch)]


def started(h: Harness, replicas: int = 2, **config: Any) -> list[str]:
    new = launched(h.deploy(spec(num_replicas=replicas, **config)))
    for replica_id in new:
        h.bring_up(replica_id)
    assert h.running() == sorted(new)
    return new


def test_deploy_persists_then_launches_and_runs() -> None:
    h = Harness()
    actions = h.deploy(spec())
    assert isinstance(actions[0], ev.PersistApp)
    assert len(launched(actions)) == 2
    assert h.status()[0] is ApplicationStatus.DEPLOYING
    for replica_id in launched(actions):
        h.bring_up(replica_id)
    assert h.status()[0] is ApplicationStatus.RUNNING
    assert h.routable() == 2


def test_rolling_update_with_a_surge_keeps_capacity() -> None:
    h = Harness()
    old = started(h)
    new = launched(h.deploy(spec("v2", max_surge_percent=100)))
    assert len(new) == 2
    assert h.routable() == 2
    actions = h.bring_up(new[0])
    stopped = [a.replica_id for a in of(actions, ev.Stop)]
    assert len(stopped) == 1  # one old replica per new one running
    assert stopped[0] in old
    assert h.routable() == 2
    actions = h.bring_up(new[1])
    stopped += [a.replica_id for a in of(actions, ev.Stop)]
    assert sorted(stopped) == sorted(old)
    assert h.routable() == 2
    for replica_id in old:
        h.feed(ev.ReplicaExited(replica_id, 0))
    assert h.running() == sorted(new)
    assert h.status()[0] is ApplicationStatus.RUNNING


def test_rolling_update_by_default_replaces_a_wave_without_exceeding_the_target() -> None:
    h = Harness()
    old = started(h, replicas=4)  # a wave is max(int(0.2 * 4), 1) = 1 replica
    actions = h.deploy(spec("v2", num_replicas=4))
    (stopped,) = [a.replica_id for a in of(actions, ev.Stop)]
    (first,) = launched(actions)  # its replacement starts while it drains (Ray's order)
    assert stopped in old
    assert h.routable() == 3
    h.feed(ev.ReplicaExited(stopped, 0))
    actions = h.bring_up(first)
    assert len(of(actions, ev.Stop)) == 1  # the next wave once the replacement runs
    assert len(launched(actions)) == 1
    live = [r for r in h.machine.replicas.values() if r.phase is not Phase.STOPPING]
    assert len(live) == 4


def test_user_config_change_reconfigures_in_place() -> None:
    h = Harness()
    replicas = started(h, user_config={"a": 1})
    actions = h.deploy(spec(user_config={"a": 2}))
    reconfigures = of(actions, ev.Reconfigure)
    assert sorted(a.replica_id for a in reconfigures) == sorted(replicas)
    assert all(a.user_config_changed for a in reconfigures)
    assert not launched(actions)
    assert not of(actions, ev.Stop)
    assert h.routable() == 2  # still routable while reconfiguring
    for replica_id in replicas:
        assert not of(h.feed(ev.CallDone(replica_id, ev.Call.RECONFIGURE, None)), ev.Launch)
    assert h.running() == sorted(replicas)
    assert h.status()[0] is ApplicationStatus.RUNNING


def test_constructor_failures_fail_the_deploy_and_keep_old_replicas() -> None:
    h = Harness()
    old = started(h)
    pending = launched(h.deploy(spec("v2", max_constructor_retry_count=3, max_surge_percent=100)))
    failures = 0
    while pending:
        replica_id = pending.pop()
        actions = h.bring_up(replica_id, Failure("ZeroDivisionError: boom"))
        failures += 1
        assert [a.replica_id for a in of(actions, ev.Stop)] == [replica_id]
        more = launched(actions + h.feed(ev.ReplicaExited(replica_id, 1)))
        assert not (more and failures >= 3)  # nothing starts once the limit is reached
        pending += more
    assert failures == 4  # the limit, plus the second replica already started by then
    assert h.deployment_status() is DeploymentStatus.DEPLOY_FAILED
    status, message = h.status()
    assert status is ApplicationStatus.DEPLOY_FAILED
    assert "boom" in message
    assert h.running() == sorted(old)  # the old version keeps serving
    assert not launched(h.feed(ev.Tick()))


def test_each_replica_is_saved_before_it_is_launched() -> None:
    actions = Harness().deploy(spec(num_replicas=3))
    for launch in of(actions, ev.Launch):
        save = next(
            a
            for a in actions
            if isinstance(a, ev.SaveReplica) and a.replica_id == launch.replica_id
        )
        assert actions.index(save) < actions.index(launch)
        assert save.request == launch.request


def fail_to_start(h: Harness, replica_id: str, host: str = "h") -> list[str]:
    """The replica's constructor raises; it is stopped and exits. What started after it."""
    actions = h.bring_up(replica_id, Failure("RuntimeError: no GPU here"), host=host)
    assert [a.replica_id for a in of(actions, ev.Stop)] == [replica_id]
    return launched(actions + h.feed(ev.ReplicaExited(replica_id, 1)))


def test_start_failures_past_the_limit_back_off_as_rays_and_the_deployment_is_unhealthy() -> None:
    h = Harness()
    first, second = launched(h.deploy(spec(num_replicas=2, max_constructor_retry_count=3)))
    h.bring_up(first)  # this version ran: failures now back off instead of failing the deploy
    (second,) = fail_to_start(h, second)
    (second,) = fail_to_start(h, second)  # below the limit (3): replaced at once
    assert h.deployment_status() is DeploymentStatus.UPDATING
    waits = []
    for _ in range(9):
        assert not fail_to_start(h, second)
        status, message = h.status()
        assert status is ApplicationStatus.UNHEALTHY
        assert "failed to start" in message
        assert "times in a row" in message
        assert "RuntimeError: no GPU here" in message
        waited = 0.0
        while not (new := launched(h.feed(ev.Tick()))):
            h.now += 0.5
            waited += 0.5
        assert f"Retrying after {waited:g} seconds" in message
        waits.append(waited)
        (second,) = new
    assert waits == [1, 2, 4, 8, 16, 32, 64, 64, 64]  # Ray's schedule, capped at 64 s
    h.bring_up(second)
    assert h.status()[0] is ApplicationStatus.RUNNING
    assert h.machine.goals()[DEP].backoff_s == 0


def test_a_node_where_replicas_keep_failing_is_avoided_for_a_while() -> None:
    h = Harness()
    replicas = launched(h.deploy(spec(num_replicas=3)))
    for replica_id in replicas[:2]:
        h.bring_up(replica_id, host="n1")
    (again,) = fail_to_start(h, replicas[2], host="n2")
    assert h.machine.replicas[again].request.avoid_nodes == ()  # once is not a pattern
    (avoiding,) = fail_to_start(h, again, host="n2")
    assert h.machine.replicas[avoiding].request.avoid_nodes == ("n2",)
    (later,) = fail_to_start(h, avoiding, host="n3")  # elsewhere: n2 is still avoided
    assert h.machine.replicas[later].request.avoid_nodes == ("n2",)
    h.bring_up(later, host="n3")
    assert h.status()[0] is ApplicationStatus.RUNNING
    h.now += NODE_AVOID_S
    (victim, *_) = replicas[:2]
    actions = h.feed(ev.ReplicaExited(victim, -9))
    (replacement,) = launched(actions)
    assert h.machine.replicas[replacement].request.avoid_nodes == ()  # the while is over


def checks(h: Harness) -> list[ev.CheckHealth]:
    return of(h.feed(ev.Tick()), ev.CheckHealth)


def test_three_failed_health_checks_kill_replace_and_mark_unhealthy_until_a_pass() -> None:
    h = Harness()
    replicas = started(h, health_check_period_s=1.0)
    sick, well = replicas
    assert not checks(h)  # not due yet
    for attempt in range(1, UNHEALTHY_AFTER + 1):
        h.now += 1.0
        due = {c.replica_id for c in checks(h)}
        assert due == {sick, well}
        assert not checks(h)  # one check at a time
        h.feed(ev.CallDone(well, ev.Call.CHECK_HEALTH, None))
        actions = h.feed(ev.CallDone(sick, ev.Call.CHECK_HEALTH, Failure("timed out")))
        if attempt < UNHEALTHY_AFTER:
            assert not of(actions, ev.Kill)
            assert h.status()[0] is ApplicationStatus.RUNNING
    assert of(actions, ev.Kill) == [ev.Kill(sick, h.machine.replicas[sick].pid)]  # no drain
    assert not of(actions, ev.Stop)
    (replacement,) = launched(actions)
    status, message = h.status()
    assert status is ApplicationStatus.UNHEALTHY
    assert sick in message
    assert "timed out" in message
    h.bring_up(replacement)
    assert h.status()[0] is ApplicationStatus.UNHEALTHY  # until a replica passes again
    h.now += 1.0
    assert well in {c.replica_id for c in checks(h)}
    h.feed(ev.CallDone(well, ev.Call.CHECK_HEALTH, None))
    assert h.status()[0] is ApplicationStatus.RUNNING


def autoscaled(**overrides: Any) -> DeploymentSpec:
    auto = {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 1.0}
    auto.update(overrides)
    return spec(num_replicas=None, autoscaling_config=AutoscalingConfig(**auto))


def handle_load(ongoing: float) -> ev.LoadReported:
    return ev.LoadReported(DEP, "handles-of-pid-1", ongoing, is_handle=True)


def test_autoscaling_applies_a_new_target_after_the_delay() -> None:
    h = Harness()
    (first,) = launched(h.deploy(autoscaled(upscale_delay_s=10.0)))
    h.bring_up(first)
    h.feed(ev.LoadReported(DEP, first, 1.0, is_handle=False))
    h.feed(handle_load(3.0))
    h.now += 5.0
    assert not launched(h.feed(handle_load(3.0)))
    h.now += 5.0
    new = launched(h.feed(ev.Tick()))
    assert len(new) == 3  # ceil((1 + 3) / 1) = 4 replicas
    assert h.machine.goals()[DEP].target_replicas == 4


def test_autoscaling_from_zero_is_immediate() -> None:
    h = Harness()
    assert not launched(h.deploy(autoscaled(min_replicas=0, upscale_delay_s=60.0)))
    assert len(launched(h.feed(handle_load(1.0)))) == 1


def test_recovery_readopts_linked_replicas_and_kills_the_rest() -> None:
    first = Harness()
    first.deploy(spec())
    goal_app = first.machine.apps[APP]
    h = Harness()
    previous = (
        ev.PreviousReplica("app#Model#a", 11, "v1", alive=True),
        ev.PreviousReplica("app#Model#b", 12, "v1", alive=True),
        ev.PreviousReplica("app#Model#c", 13, "v1", alive=False),
    )
    actions = h.feed(ev.Restored((goal_app,), previous))
    assert [a.replica_id for a in of(actions, ev.Forget)] == ["app#Model#c"]
    assert not launched(actions)  # the two alive ones count towards the target
    assert not h.machine.recovered  # so the supervisor publishes nothing yet
    actions = h.feed(ev.ReplicaLinked("app#Model#a", "127.0.0.1:1", 11, "h", True, "v1", b""))
    assert of(actions, ev.LinkVerdict) == [ev.LinkVerdict("app#Model#a", ev.Verdict.ACCEPTED)]
    assert not launched(actions)  # no restart
    assert not of(actions, ev.Initialize)
    assert h.running() == ["app#Model#a"]
    assert not h.machine.recovered
    h.now += RECOVERY_WAIT_S / 2
    assert not of(h.feed(ev.Tick()), ev.Kill)
    h.now += RECOVERY_WAIT_S
    actions = h.feed(ev.Tick())
    assert of(actions, ev.Kill) == [ev.Kill("app#Model#b", 12)]
    assert len(launched(actions)) == 1  # the one that did not come back is replaced
    assert h.machine.recovered
    assert h.routable() == 1


def test_recovery_ends_when_every_replica_relinked() -> None:
    first = Harness()
    first.deploy(spec(num_replicas=1))
    h = Harness()
    h.feed(
        ev.Restored(
            (first.machine.apps[APP],), (ev.PreviousReplica("app#Model#a", 11, "v1", True),)
        )
    )
    h.feed(ev.ReplicaLinked("app#Model#a", "127.0.0.1:1", 11, "h", True, "v1", b""))
    assert h.machine.recovered
    assert h.routable() == 1


def test_a_link_from_outside_the_goal_is_told_to_stop() -> None:
    h = Harness()
    started(h)
    actions = h.feed(ev.ReplicaLinked("other#Model#x", "127.0.0.1:9", 9, "h", True, "v1", b""))
    assert of(actions, ev.LinkVerdict) == [ev.LinkVerdict("other#Model#x", ev.Verdict.STOP)]


def test_a_stale_call_outcome_is_ignored() -> None:
    h = Harness()
    started(h)
    h.deploy(spec(num_replicas=1))  # scales down: one replica stops
    stopping = [r for r in h.machine.replicas.values() if r.phase is Phase.STOPPING]
    assert len(stopping) == 1
    victim = stopping[0].replica_id
    assert not h.feed(ev.CallDone(victim, ev.Call.RECONFIGURE, None))
    assert h.machine.replicas[victim].phase is Phase.STOPPING


def test_delete_stops_replicas_then_forgets_the_app() -> None:
    h = Harness()
    replicas = started(h)
    actions = h.feed(ev.AppDeleteRequested(APP))
    assert of(actions, ev.MarkDeleting) == [ev.MarkDeleting(APP)]
    assert sorted(a.replica_id for a in of(actions, ev.Stop)) == sorted(replicas)
    assert h.status()[0] is ApplicationStatus.DELETING
    h.feed(ev.ReplicaExited(replicas[0], 0))
    actions = h.feed(ev.ReplicaExited(replicas[1], 0))
    assert of(actions, ev.DeleteApp) == [ev.DeleteApp(APP)]
    assert APP not in h.machine.apps


def test_recovery_mid_rollout_readopts_both_versions_and_continues_the_rollout() -> None:
    first = Harness()
    first.deploy(spec("v1"))
    # the saved goal: v2 (started before stopping), while v1 replicas still served
    first.deploy(spec("v2", max_surge_percent=100))
    h = Harness()
    previous = (
        ev.PreviousReplica("app#Model#old1", 11, "v1", alive=True),
        ev.PreviousReplica("app#Model#old2", 12, "v1", alive=True),
        ev.PreviousReplica("app#Model#ready", 13, "v2", alive=True),
        ev.PreviousReplica("app#Model#busy", 14, "v2", alive=True),  # constructor was running
    )
    assert not launched(h.feed(ev.Restored((first.machine.apps[APP],), previous)))

    def link(replica_id: str, pid: int, version: str, initialized: bool) -> list[ev.Action]:
        return h.feed(
            ev.ReplicaLinked(replica_id, f"127.0.0.1:{pid}", pid, "h", initialized, version, b"")
        )

    for replica_id, pid, version in (("app#Model#old1", 11, "v1"), ("app#Model#old2", 12, "v1")):
        actions = link(replica_id, pid, version, True)
        assert of(actions, ev.LinkVerdict) == [ev.LinkVerdict(replica_id, ev.Verdict.ACCEPTED)]
        assert not of(actions, ev.Stop)
    actions = link("app#Model#ready", 13, "v2", True)
    stopped = [a.replica_id for a in of(actions, ev.Stop)]
    assert len(stopped) == 1  # one new replica runs: one old one goes
    assert h.routable() == 2
    actions = link("app#Model#busy", 14, "v2", False)
    assert of(actions, ev.LinkVerdict) == [ev.LinkVerdict("app#Model#busy", ev.Verdict.STOP)]
    assert h.machine.recovered
    (replacement,) = launched(actions)
    assert not of(actions, ev.Stop)
    assert h.routable() == 2
    stopped += [a.replica_id for a in of(h.bring_up(replacement), ev.Stop)]
    assert sorted(stopped) == ["app#Model#old1", "app#Model#old2"]
    assert h.routable() == 2


def test_replicas_get_the_lowest_free_rank_and_the_world_size() -> None:
    h = Harness()
    first = started(h, replicas=3)
    ranks = {h.machine.replicas[r].rank for r in first}
    assert ranks == {0, 1, 2}
    # A replica that dies is replaced by one taking its rank back.
    gone = next(r for r in first if h.machine.replicas[r].rank == 1)
    actions = h.feed(ev.ReplicaExited(gone, -9))
    actions += h.feed(ev.Tick())
    (replacement,) = launched(actions)
    assert h.machine.replicas[replacement].rank == 1
    initialize = of(h.bring_up(replacement), ev.Initialize)[0]
    assert (initialize.rank, initialize.world_size) == (1, 3)


def test_a_launch_carries_the_resource_request() -> None:
    h = Harness()
    actions = h.deploy(
        spec(ray_actor_options={"num_cpus": 2, "num_gpus": 1}, max_replicas_per_node=1)
    )
    requests = [a.request for a in of(actions, ev.Launch)]
    assert len(requests) == 2
    assert requests[0].num_cpus == 2.0
    assert requests[0].num_gpus == 1.0
    assert requests[0].max_replicas_per_node == 1
    assert requests[0].group == str(DEP)


def test_a_pending_replica_says_why_and_waits_without_a_link_timeout() -> None:
    h = Harness()
    first, second = launched(h.deploy(spec()))
    h.bring_up(first)
    h.feed(ev.ReplicaPending(second, 'needs {"CPU": 1.0}: 0 of 2 free'))
    status, message = h.status()
    assert status is ApplicationStatus.DEPLOYING
    assert "1/2 replicas ready; 1 replica(s) pending: needs" in message
    h.now += 3600  # pending far beyond the link timeout: still pending, not failed
    assert not of(h.feed(ev.Tick()), ev.Stop)
    assert second in h.machine.replicas
    h.bring_up(second)
    assert h.status()[0] is ApplicationStatus.RUNNING


def test_a_replica_that_ended_is_not_re_adopted_when_it_links_again() -> None:
    """Its job was declared lost (node failure) while the process lived on."""
    h = Harness()
    (replica,) = launched(h.deploy(spec(num_replicas=1)))
    h.bring_up(replica)
    actions = h.feed(ev.ReplicaExited(replica, None, "Slurm job 3 on n1 ended: NODE_FAIL"))
    assert len(launched(actions)) == 1  # replaced
    verdicts = of(
        h.feed(ev.ReplicaLinked(replica, "10.0.0.1:5", 7, "n1", True, "v1", b"")), ev.LinkVerdict
    )
    assert [v.verdict for v in verdicts] == [ev.Verdict.STOP]


def gang_spec(replicas: int = 4, version: str = "v1", **config: Any) -> DeploymentSpec:
    gang = {
        "gang_size": 2,
        "gang_timeout_s": 300.0,
        "gang_placement_strategy": "SPREAD",
        "max_retries": 3,
        "runtime_failure_policy": "RESTART_GANG",
    }
    return spec(version, num_replicas=replicas, gang_scheduling_config=gang, **config)


def gangs_launched(actions: Sequence[ev.Action]) -> list[ev.LaunchGang]:
    return of(actions, ev.LaunchGang)


def test_gangs_are_saved_then_launched_whole_with_their_context() -> None:
    h = Harness()
    actions = h.deploy(gang_spec())
    assert not launched(actions)  # no replica is launched alone
    gangs = gangs_launched(actions)
    assert len(gangs) == 2
    for gang in gangs:
        assert len(gang.gang.members) == 2
        assert gang.request.gang_size == 2
        assert gang.request.gang_strategy == "SPREAD"
        assert gang.request.gang_id == gang.gang.gang_id
        saves = [
            i
            for i, a in enumerate(actions)
            if isinstance(a, ev.SaveReplica) and a.replica_id in gang.gang.members
        ]
        assert len(saves) == 2
        assert actions.index(gang) > max(saves)  # every member durable before the launch
        context = gang.gang.context(1)
        assert context["rank"] == 1
        assert context["world_size"] == 2
        assert context["member_replica_ids"] == [m.rsplit("#", 1)[1] for m in gang.gang.members]
    assert gangs[0].gang.gang_id != gangs[1].gang.gang_id


def test_a_gang_that_loses_a_member_is_restarted_whole() -> None:
    h = Harness()
    gangs = [g.gang for g in gangs_launched(h.deploy(gang_spec()))]
    for gang in gangs:
        for member in gang.members:
            h.bring_up(member)
    assert h.status()[0] is ApplicationStatus.RUNNING
    broken, whole = gangs
    actions = h.feed(ev.ReplicaExited(broken.members[0], -9))
    killed = {a.replica_id for a in of(actions, ev.Kill)}
    assert killed == {broken.members[1]}  # its sibling, not the other gang
    (replacement,) = gangs_launched(actions)  # a new gang of two in its place
    assert not set(replacement.gang.members) & set(broken.members)
    h.feed(ev.ReplicaExited(broken.members[1], -9))
    assert sorted(h.running()) == sorted(whole.members)


def test_gangs_scale_down_whole_and_autoscale_by_whole_gangs() -> None:
    h = Harness()
    for launch in gangs_launched(h.deploy(gang_spec(version="v1"))):
        for member in launch.gang.members:
            h.bring_up(member)
    actions = h.deploy(gang_spec(replicas=2, version="v1"))
    stopped = {a.replica_id for a in of(actions, ev.Stop)}
    assert len(stopped) == 2
    assert len({h.machine.replicas[r].gang_id for r in stopped}) == 1  # one whole gang
    goal = h.machine.goals()[DEP]
    for scaling in (1, -1):  # rounded up either way: a count always gives the same target
        goal.target_replicas, goal.scaling = 3, scaling
        whole_gangs(goal)
        assert goal.target_replicas == 4
    assert [goal.whole_gangs(n) for n in (0, 1, 2, 5)] == [2, 2, 2, 6]


def test_a_gang_deployment_does_not_oscillate_around_a_count_between_gangs() -> None:
    """The default policy wants 3 replicas, in gangs of two: the target becomes 4 and, with
    the load unchanged, stays 4 (rounding down on the way back used to drop it to 2, then up
    to 4 again, forever); the recorded decision shows the rounded target and why."""
    h = Harness()
    auto = AutoscalingConfig(
        min_replicas=2,
        max_replicas=6,
        target_ongoing_requests=1.0,
        upscale_delay_s=0.0,
        downscale_delay_s=0.0,
    )
    h.deploy(gang_spec(replicas=None, autoscaling_config=auto))
    goal = h.machine.goals()[DEP]
    targets = []
    for _ in range(6):
        h.feed(handle_load(3.0))
        h.now += 1.0
        h.feed(ev.Tick())
        targets.append(goal.target_replicas)
    assert targets == [4] * 6
    (decision,) = goal.scaling_decisions
    assert (decision.prev_num_replicas, decision.curr_num_replicas) == (2, 4)
    assert "3 rounded up to whole gangs of 2" in decision.reason


def three_each(contexts: dict[Any, AutoscalingContext]) -> Any:
    return {d: 3 for d in contexts}, {}


def test_an_application_policy_scales_a_gang_deployment_by_whole_gangs() -> None:
    """autoscale_all decides for the whole application (3 replicas); the target is then
    rounded up to whole gangs (4) and whole gangs start."""
    h = Harness()
    auto = AutoscalingConfig(min_replicas=2, max_replicas=6, upscale_delay_s=0)
    gang = gang_spec(replicas=None, autoscaling_config=auto)
    policy = AutoscalingPolicy(policy_function=three_each)
    actions = h.feed(ev.AppDeployed(APP, None, "Model", (gang,), CodeEnv("/", ()), 0.0, "", policy))
    goal = h.machine.goals()[DEP]
    assert goal.scaling_decisions[0].policy.endswith("three_each")
    assert goal.target_replicas == 4
    assert [len(g.gang.members) for g in gangs_launched(actions)] == [2, 2]
    assert not launched(actions)


def test_a_restarted_controller_keeps_gangs_whole() -> None:
    """Gang members re-link with their gang; one that never comes back gets its gang restarted
    once recovery is over (Ray's incomplete gang detection)."""
    first = Harness()
    (launch,) = gangs_launched(first.deploy(gang_spec(replicas=2)))
    members = launch.gang.members
    h = Harness()
    previous = tuple(ev.PreviousReplica(m, 10 + i, "v1", True) for i, m in enumerate(members))
    h.feed(ev.Restored((first.machine.apps[APP],), previous))
    back, lost = members
    h.feed(
        ev.ReplicaLinked(
            back, "127.0.0.1:1", 10, "n1", True, "v1", b"", False, launch.gang.gang_id, 0, members
        )
    )
    record = h.machine.replicas[back]
    assert (record.gang_id, record.gang_rank, record.gang_members) == (
        launch.gang.gang_id,
        0,
        members,
    )
    h.now += RECOVERY_WAIT_S + 1
    actions = h.feed(ev.Tick())  # the lost member never re-linked: its gang restarts whole
    assert {a.replica_id for a in of(actions, ev.Kill)} == {back, lost}
    (restart,) = gangs_launched(actions)
    assert restart.gang.gang_id != launch.gang.gang_id
