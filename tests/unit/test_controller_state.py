"""The controller's plan (goal vs actual) and status, as pure functions."""

from controller.state import (
    AppGoal,
    DeploymentGoal,
    Phase,
    ReconfigureReplica,
    ReplicaRecord,
    StartReplicas,
    StopReplica,
    application_status,
    deployment_status,
    plan,
)
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec, Failure

DEP = DeploymentID("Model", "app")


def goal(version: str = "v1", replicas: int = 2, user_config: object = None) -> DeploymentGoal:
    config = DeploymentConfig(num_replicas=replicas, user_config=user_config)
    return DeploymentGoal(DEP, DeploymentSpec("Model", b"", b"", version, config), replicas)


def record(
    rid: str,
    version: str = "v1",
    phase: Phase = Phase.RUNNING,
    started: float = 0.0,
    user_config: bytes | None = None,
) -> ReplicaRecord:
    return ReplicaRecord(
        rid,
        DEP,
        version,
        phase,
        started,
        user_config_json=user_config,
        max_ongoing_requests=5,
    )


def test_starts_missing_replicas() -> None:
    assert plan({DEP: goal(replicas=3)}, [record("a")]) == [StartReplicas(DEP, 2)]


def test_nothing_to_do_when_converged() -> None:
    assert plan({DEP: goal()}, [record("a"), record("b")]) == []


def test_scale_down_stops_not_yet_running_then_newest() -> None:
    replicas = [
        record("old", started=1),
        record("new", started=3),
        record("starting", phase=Phase.STARTING, started=2),
    ]
    assert plan({DEP: goal(replicas=1)}, replicas) == [StopReplica("starting"), StopReplica("new")]


def rollout_goal(
    replicas: int, percentage: float = 0.2, surge: float = 0.0, gang: object = None
) -> DeploymentGoal:
    config = DeploymentConfig(
        num_replicas=replicas,
        rolling_update_percentage=percentage,
        max_surge_percent=surge,
        gang_scheduling_config=gang,
    )
    return DeploymentGoal(DEP, DeploymentSpec("Model", b"", b"", "v2", config), replicas)


def test_rolling_update_stops_a_wave_of_old_replicas_before_starting_new_ones() -> None:
    old = [record(f"o{i}", "v1", started=i) for i in range(5)]
    # max(int(0.4 * 5), 1) = 2 old replicas stop, then 2 new ones start in their place
    steps = plan({DEP: rollout_goal(5, percentage=0.4)}, old)
    assert [a for a in steps if isinstance(a, StopReplica)] == [
        StopReplica("o4"),
        StopReplica("o3"),
    ]
    assert [a for a in steps if isinstance(a, StartReplicas)] == [StartReplicas(DEP, 2)]


def test_rolling_update_with_a_surge_starts_new_before_stopping_old() -> None:
    g = rollout_goal(2, surge=100)
    old = [record("o1", "v1"), record("o2", "v1")]
    assert plan({DEP: g}, old) == [StartReplicas(DEP, 2)]  # ceil(2 * 100 / 100) above target
    starting = [*old, record("n1", "v2", Phase.INITIALIZING), record("n2", "v2", Phase.STARTING)]
    assert plan({DEP: g}, starting) == []  # nothing stops before a replacement runs
    one_running = [*old, record("n1", "v2"), record("n2", "v2", Phase.INITIALIZING)]
    assert len([a for a in plan({DEP: g}, one_running) if isinstance(a, StopReplica)]) == 1


GANG = {
    "gang_size": 2,
    "gang_timeout_s": 300.0,
    "gang_placement_strategy": "PACK",
    "max_retries": 3,
    "runtime_failure_policy": "RESTART_GANG",
}


def gangs(
    prefix: str, version: str, sizes: list[int], phase: Phase, started: float = 0.0
) -> list[ReplicaRecord]:
    """Replicas in gangs of the given sizes (size 1: no gang), as the machine records them."""
    out: list[ReplicaRecord] = []
    for g, size in enumerate(sizes):
        members = tuple(f"{prefix}{g}.{m}" for m in range(size))
        for rank, rid in enumerate(members):
            r = record(rid, version, phase, started=started + len(out))
            if size > 1:
                r.gang_id, r.gang_rank, r.gang_members = f"{prefix}{g}", rank, members
            out.append(r)
    return out


def simulate_rollout(goal: DeploymentGoal, old: int | list[int]) -> list[tuple[int, int]]:
    """Run a rollout to the end, replicas starting and stopping one step after asked; returns
    (replicas neither stopping nor gone, replicas of any state) after every step. ``old``: how
    many old replicas, or the sizes of their gangs; every step must start and stop whole gangs.
    """
    records = gangs("o", "v1", [1] * old if isinstance(old, int) else old, Phase.RUNNING)
    size = max(goal.gang_size, 1)
    seen: list[tuple[int, int]] = []
    serial = 0
    for _ in range(100):
        # what was asked last step happens now: started replicas run, stopped ones are gone
        records = [r for r in records if r.phase is not Phase.STOPPING]
        for r in records:
            if r.phase is Phase.STARTING:
                r.phase = Phase.RUNNING
        steps = plan({DEP: goal}, records)
        if not steps and all(r.code_version == "v2" for r in records):
            return seen
        stopped = {a.replica_id for a in steps if isinstance(a, StopReplica)}
        for r in records:
            if r.replica_id in stopped:
                assert set(r.gang_members) <= stopped, f"{r.replica_id} stopped without its gang"
                r.phase = Phase.STOPPING
        for step in steps:
            if isinstance(step, StartReplicas):
                assert step.count % size == 0, "a start of part of a gang"
                for _ in range(step.count // size):
                    serial += 1
                    records += gangs(f"n{serial}.", "v2", [size], Phase.STARTING, 10 + serial)
        live = sum(1 for r in records if r.phase is not Phase.STOPPING)
        seen.append((live, len(records)))
    raise AssertionError("the rollout did not finish")


def test_a_rollout_without_surge_never_exceeds_the_target() -> None:
    seen = simulate_rollout(rollout_goal(5, percentage=0.2), 5)
    assert max(live for live, _ in seen) == 5
    # and it replaced one replica at a time: never more than one old one stopping
    assert max(total for _, total in seen) <= 6


def test_a_rollout_with_surge_stays_within_the_surge() -> None:
    seen = simulate_rollout(rollout_goal(4, percentage=0.5, surge=50), 4)
    assert max(live for live, _ in seen) == 6  # 4 + ceil(4 * 50 / 100)
    assert min(live for live, _ in seen) >= 4


def test_a_gang_rollout_without_surge_replaces_whole_gangs_within_the_target() -> None:
    # a wave of max(int(0.2 * 6), 1) = 1 replica is rounded up to one whole gang
    assert max(live for live, _ in simulate_rollout(rollout_goal(6, gang=GANG), [2, 2, 2])) == 6
    first = plan({DEP: rollout_goal(6, gang=GANG)}, gangs("o", "v1", [2, 2, 2], Phase.RUNNING))
    assert [a for a in first if isinstance(a, StartReplicas)] == [StartReplicas(DEP, 2)]
    assert len([a for a in first if isinstance(a, StopReplica)]) == 2


def test_a_gang_rollout_with_surge_starts_whole_gangs_first_and_keeps_capacity() -> None:
    # a surge of ceil(4 * 25 / 100) = 1 replica is rounded up to one whole gang
    seen = simulate_rollout(rollout_goal(4, surge=25, gang=GANG), [2, 2])
    assert max(live for live, _ in seen) == 6
    assert min(live for live, _ in seen) >= 4
    first = plan(
        {DEP: rollout_goal(4, surge=25, gang=GANG)}, gangs("o", "v1", [2, 2], Phase.RUNNING)
    )
    assert first == [StartReplicas(DEP, 2)]


def test_a_rollout_that_changes_the_gang_size_finishes() -> None:
    for surge in (0.0, 50.0):
        simulate_rollout(rollout_goal(4, surge=surge, gang=GANG), [1, 1, 1, 1])  # no gangs -> gangs
        simulate_rollout(
            rollout_goal(4, surge=surge, gang=GANG), [4]
        )  # an old gang bigger than a wave
        simulate_rollout(rollout_goal(4, surge=surge, gang=GANG), [3, 3])  # and more old replicas


def test_gangs_scale_down_whole_and_start_whole() -> None:
    running = gangs("n", "v2", [2, 2, 2], Phase.RUNNING)
    stops = plan({DEP: rollout_goal(4, gang=GANG)}, running)
    assert {a.replica_id for a in stops if isinstance(a, StopReplica)} == {"n2.0", "n2.1"}
    assert plan({DEP: rollout_goal(6, gang=GANG)}, running[:4]) == [StartReplicas(DEP, 2)]


def test_failed_deployment_keeps_old_replicas_and_starts_nothing() -> None:
    g = goal("v2")
    g.failed = True
    assert plan({DEP: g}, [record("o1", "v1"), record("o2", "v1")]) == []


def test_replicas_of_deleted_deployments_stop() -> None:
    assert plan({}, [record("a"), record("b", phase=Phase.STOPPING)]) == [StopReplica("a")]


def test_user_config_change_reconfigures_in_place() -> None:
    g = goal(user_config={"x": 1})
    stale = record("a", user_config=b'{"x":0}')
    fresh = record("b", user_config=b'{"x":1}')
    assert plan({DEP: g}, [stale, fresh]) == [ReconfigureReplica("a")]


def test_status_healthy_updating_failed() -> None:
    g = goal(replicas=2)
    view = deployment_status(g, [record("a"), record("b")])
    assert view.status.value == "HEALTHY"
    assert view.replica_states == {"RUNNING": 2}
    view = deployment_status(g, [record("a"), record("b", phase=Phase.INITIALIZING)])
    assert view.status.value == "UPDATING"
    assert view.replica_states == {"RUNNING": 1, "STARTING": 1}
    g.failed, g.failures = True, 3
    g.last_error = Failure("ValueError: boom")
    view = deployment_status(g, [])
    assert view.status.value == "DEPLOY_FAILED"
    assert "ValueError: boom" in view.message


def test_failure_limit_is_rays_formula() -> None:
    assert goal(replicas=1).failure_limit() == 3
    assert goal(replicas=10).failure_limit() == 20


def test_application_status() -> None:
    app = AppGoal("app", "Model", "/", CodeEnv("/", ()), {"Model": goal()}, 0.0)
    healthy = deployment_status(goal(), [record("a"), record("b")])
    updating = deployment_status(goal(), [record("a")])
    assert application_status(app, {"Model": healthy})[0].value == "RUNNING"
    assert application_status(app, {"Model": updating})[0].value == "DEPLOYING"
    app.deleting = True
    assert application_status(app, {"Model": healthy})[0].value == "DELETING"
