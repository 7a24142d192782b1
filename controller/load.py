"""Load reports from replicas and handles: autoscaling decisions and the metrics snapshot."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from controller.autoscale import LoadSource, ScaleDecider, total_load
from controller.metrics import HandleMetrics, ReplicaMetrics, Snapshot
from serve._models import DeploymentID

if TYPE_CHECKING:
    from controller.reconciler import Controller

logger = logging.getLogger(__name__)


class LoadTracker:
    """What each replica (running) and each process's handles (queued) last reported."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        # deployment -> source (a replica, or one process's handles) -> what it reported
        self.sources: dict[DeploymentID, dict[str, LoadSource]] = {}
        self._deciders: dict[DeploymentID, ScaleDecider] = {}

    def report(
        self,
        deployment_id: DeploymentID,
        source_id: str,
        ongoing: float,
        *,
        is_handle: bool,
        requests_total: int = 0,
        errors_total: int = 0,
        latency_buckets: tuple[int, ...] = (),
        latency_sum_ms: float = 0.0,
    ) -> None:
        """Load from replicas (running) and handles (queued): for autoscaling and metrics."""
        if self._controller.goal(deployment_id) is None:
            return
        if not is_handle and source_id not in self._controller.replicas:
            return  # a replica this controller no longer runs
        sources = self.sources.setdefault(deployment_id, {})
        source = sources.get(source_id)
        if source is None:
            source = sources[source_id] = LoadSource(is_handle=is_handle)
        now = time.monotonic()
        source.window.add(now, ongoing, self.look_back_s(deployment_id))
        source.ongoing = ongoing
        source.requests_total = requests_total
        source.errors_total = errors_total
        source.latency_buckets = latency_buckets
        source.latency_sum_ms = latency_sum_ms
        source.seen_s = now
        if is_handle and ongoing > 0:
            self.autoscale(deployment_id, now)  # scaling from zero must not wait for a tick

    def look_back_s(self, deployment_id: DeploymentID) -> float:
        goal = self._controller.goal(deployment_id)
        auto = goal.spec.config.autoscaling_config if goal is not None else None
        return auto.look_back_period_s if auto is not None else 30.0

    def prune(self, now: float) -> None:
        """Forget replicas that are gone and handles that stopped reporting."""
        for deployment_id, sources in list(self.sources.items()):
            if self._controller.goal(deployment_id) is None:
                del self.sources[deployment_id]
                continue
            expire_s = max(3 * self.look_back_s(deployment_id), 60.0)
            for source_id, source in list(sources.items()):
                gone = not source.is_handle and source_id not in self._controller.replicas
                if gone or now - source.seen_s > expire_s:
                    del sources[source_id]

    def autoscale(self, deployment_id: DeploymentID, now: float) -> None:
        goal = self._controller.goal(deployment_id)
        if goal is None or goal.spec.config.autoscaling_config is None or goal.failed:
            return
        auto = goal.spec.config.autoscaling_config
        sources = self.sources.get(deployment_id, {})
        load = total_load((s.window for s in sources.values()), now, auto.look_back_period_s)
        # A running replica that has not reported yet is assumed at target: missing data must
        # never read as idleness (and trigger a downscale).
        for record in self._controller.replicas.values():
            if (
                record.deployment_id == deployment_id
                and record.phase.routable
                and record.replica_id not in sources
            ):
                load += auto.target_ongoing_requests
        decider = self._deciders.setdefault(deployment_id, ScaleDecider())
        target = decider.decide(auto, goal.target_replicas, load, now)
        if target is not None and target != goal.target_replicas:
            logger.info(
                "Autoscaling %s from %d to %d replicas (load %.1f, target %.1f per replica)",
                deployment_id,
                goal.target_replicas,
                target,
                load,
                auto.target_ongoing_requests,
            )
            goal.scaling = 1 if target > goal.target_replicas else -1
            goal.target_replicas = target
            self._controller.changed()

    def metrics_snapshot(self) -> Snapshot:
        """What /metrics shows, taken at once (on the loop)."""
        replicas, handles = [], []
        for deployment_id, sources in self.sources.items():
            for source_id, source in sources.items():
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
                record = self._controller.replicas.get(source_id)
                replicas.append(
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
                    )
                )
        states, app_status, dep_status = [], [], []
        for app in self._controller.apps.values():
            app_status.append((app.name, self._controller.app_status(app)[0].value))
            for name, view in self._controller.deployment_views(app).items():
                dep_status.append((app.name, name, view.status.value))
                for state, count in view.replica_states.items():
                    states.append((app.name, name, state, count))
        return Snapshot(
            replicas=replicas,
            handles=handles,
            replica_states=states,
            replica_starts=[
                (d.app_name, d.name, n) for d, n in self._controller.replica_starts.items()
            ],
            application_status=app_status,
            deployment_status=dep_status,
            loop_duration_s=self._controller.loop_duration_s,
            loops=self._controller.loops,
        )
