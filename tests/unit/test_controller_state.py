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


def test_rolling_update_starts_new_before_stopping_old() -> None:
    old = [record("o1", "v1"), record("o2", "v1")]
    assert plan({DEP: goal("v2")}, old) == [StartReplicas(DEP, 2)]
    one_new_running = [*old, record("n1", "v2"), record("n2", "v2", Phase.INITIALIZING)]
    actions = plan({DEP: goal("v2")}, one_new_running)
    assert len([a for a in actions if isinstance(a, StopReplica)]) == 1
    all_new = [*old, record("n1", "v2"), record("n2", "v2")]
    assert sorted(a.replica_id for a in plan({DEP: goal("v2")}, all_new)) == ["o1", "o2"]  # type: ignore[union-attr]


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
