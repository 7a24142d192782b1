"""What the outside sees of the controller's state: replica sets, status, a metrics snapshot.

Pure functions of the goals and the replica records; the supervisor derives publication and
wakes status waiters from them after every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from controller.autoscale import LoadSource
from controller.metrics import HandleMetrics, ReplicaMetrics, Snapshot
from controller.state import (
    AppGoal,
    DeploymentGoal,
    DeploymentView,
    ReplicaRecord,
    application_status,
    deployment_status,
)
from serve._models import ApplicationStatus, DeploymentID, ReplicaInfo, ReplicaSet


def deployment_views(app: AppGoal, replicas: Iterable[ReplicaRecord]) -> dict[str, DeploymentView]:
    by_deployment: dict[DeploymentID, list[ReplicaRecord]] = {}
    for record in replicas:
        by_deployment.setdefault(record.deployment_id, []).append(record)
    return {
        name: deployment_status(goal, by_deployment.get(goal.deployment_id, []))
        for name, goal in app.deployments.items()
    }


def app_status(app: AppGoal, replicas: Iterable[ReplicaRecord]) -> tuple[ApplicationStatus, str]:
    return application_status(app, deployment_views(app, replicas))


def replica_sets(
    goals: Mapping[DeploymentID, DeploymentGoal], replicas: Iterable[ReplicaRecord]
) -> dict[DeploymentID, ReplicaSet]:
    """Every deployment's routable replica set (version 0: the publisher numbers them)."""
    routable: dict[DeploymentID, list[ReplicaRecord]] = {}
    for record in sorted(replicas, key=lambda r: r.replica_id):
        if record.phase.routable:
            routable.setdefault(record.deployment_id, []).append(record)
    sets = {}
    for deployment_id, goal in goals.items():
        config = goal.spec.config
        auto = config.autoscaling_config
        running = routable.get(deployment_id, ())
        unavailable = ""
        if goal.failed and not running:
            why = goal.last_error.message if goal.last_error else "its replicas failed to start"
            unavailable = f"its deployment failed: {why}"
        sets[deployment_id] = ReplicaSet(
            version=0,
            exists=True,
            replicas=tuple(
                ReplicaInfo(
                    replica_id=r.replica_id,
                    address=r.address,
                    host=r.host,
                    max_ongoing_requests=r.max_ongoing_requests,
                    model_ids=r.model_ids,
                    routing_stats_json=r.routing_stats_json,
                    ingress_http_address=r.ingress_http_address,
                    ingress_grpc_address=r.ingress_grpc_address,
                )
                for r in running
            ),
            max_queued_requests=config.max_queued_requests,
            max_ongoing_requests=config.max_ongoing_requests,
            autoscaling=auto is not None,
            metrics_interval_s=auto.metrics_interval_s if auto is not None else 0.0,
            unavailable=unavailable,
            request_router=config.request_router_config,
            backpressure=config.backpressure_config,
        )
    return sets


def status_key(apps: Iterable[AppGoal], replicas: Iterable[ReplicaRecord]) -> object:
    """A value that changes whenever anything a status waiter may wait for changes."""
    records = list(replicas)
    return (
        [
            (app.name, app.deleting, app_status(app, records), deployment_views(app, records))
            for app in apps
        ],
        [(r.replica_id, r.phase) for r in records],
    )


def metrics_snapshot(
    *,
    apps: Iterable[AppGoal],
    replicas: Mapping[str, ReplicaRecord],
    sources: Mapping[DeploymentID, Mapping[str, LoadSource]],
    replica_starts: Mapping[DeploymentID, int],
    loop_duration_s: float,
    loops: int,
) -> Snapshot:
    """What /metrics shows."""
    replica_rows, handles = [], []
    for deployment_id, by_source in sources.items():
        for source_id, source in by_source.items():
            if source.is_handle:
                handles.append(
                    HandleMetrics(
                        deployment_id.app_name,
                        deployment_id.name,
                        source_id,
                        source.ongoing,
                        source.requests_total,
                    )
                )
                continue
            record = replicas.get(source_id)
            replica_rows.append(
                ReplicaMetrics(
                    application=deployment_id.app_name,
                    deployment=deployment_id.name,
                    replica=source_id,
                    requests=source.requests_total,
                    errors=source.errors_total,
                    latency_buckets=source.latency_buckets,
                    latency_sum_ms=source.latency_sum_ms,
                    ongoing=source.ongoing,
                    healthy=record is not None
                    and record.phase.routable
                    and record.health_failures == 0,
                    models=len(record.model_ids) if record is not None else 0,
                    user_metrics=source.user_metrics,
                )
            )
    states, app_rows, dep_rows = [], [], []
    records = list(replicas.values())
    for app in apps:
        views = deployment_views(app, records)
        app_rows.append((app.name, application_status(app, views)[0].value))
        for name, view in views.items():
            dep_rows.append((app.name, name, view.status.value))
            for state, count in view.replica_states.items():
                states.append((app.name, name, state, count))
    return Snapshot(
        replicas=replica_rows,
        handles=handles,
        replica_states=states,
        replica_starts=[(d.app_name, d.name, n) for d, n in replica_starts.items()],
        application_status=app_rows,
        deployment_status=dep_rows,
        loop_duration_s=loop_duration_s,
        loops=loops,
    )
