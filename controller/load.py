"""Load reports from replicas and handles, and the autoscaling decision built on them. Pure.

Each source (a replica, or one process's handles) keeps a window of what it reported; the
deployment's load is the sum of their averages (``autoscale.total_load``) and
``autoscale.ScaleDecider`` turns it into a replica count after the configured delays.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Protocol

from controller.autoscale import LoadSource, ScaleDecider, total_load
from controller.events import LoadReported
from controller.state import DeploymentGoal
from serve._models import DeploymentID
from serve.config import AutoscalingConfig

logger = logging.getLogger(__name__)

DEFAULT_LOOK_BACK_S = 30.0


class Autoscaler(Protocol):
    """What the state machine asks about load; it never hands over its records' owner."""

    def report(self, event: LoadReported, look_back_s: float, now_s: float) -> None: ...

    def prune(
        self, look_back_s: dict[DeploymentID, float], replica_ids: Collection[str], now_s: float
    ) -> None: ...

    def decide(
        self,
        deployment_id: DeploymentID,
        config: AutoscalingConfig,
        current: int,
        routable_ids: Collection[str],
        now_s: float,
    ) -> int | None: ...


class LoadBook:
    """What each replica (running) and each process's handles (queued) last reported."""

    def __init__(self) -> None:
        # deployment -> source (a replica, or one process's handles) -> what it reported
        self.sources: dict[DeploymentID, dict[str, LoadSource]] = {}
        self._deciders: dict[DeploymentID, ScaleDecider] = {}

    def report(self, event: LoadReported, look_back_s: float, now_s: float) -> None:
        sources = self.sources.setdefault(event.deployment_id, {})
        source = sources.get(event.source_id)
        if source is None:
            source = sources[event.source_id] = LoadSource(is_handle=event.is_handle)
        source.window.add(now_s, event.ongoing, look_back_s)
        source.ongoing = event.ongoing
        source.requests_total = event.requests_total
        source.errors_total = event.errors_total
        source.latency_buckets = event.latency_buckets
        source.latency_sum_ms = event.latency_sum_ms
        source.user_metrics = event.user_metrics
        source.seen_s = now_s

    def prune(
        self, look_back_s: dict[DeploymentID, float], replica_ids: Collection[str], now_s: float
    ) -> None:
        """Forget deployments and replicas that are gone, and handles that stopped reporting.

        ``look_back_s`` has one entry per deployment that still exists.
        """
        for deployment_id, sources in list(self.sources.items()):
            if deployment_id not in look_back_s:
                del self.sources[deployment_id]
                continue
            expire_s = max(3 * look_back_s[deployment_id], 60.0)
            for source_id, source in list(sources.items()):
                gone = not source.is_handle and source_id not in replica_ids
                if gone or now_s - source.seen_s > expire_s:
                    del sources[source_id]

    def decide(
        self,
        deployment_id: DeploymentID,
        config: AutoscalingConfig,
        current: int,
        routable_ids: Collection[str],
        now_s: float,
    ) -> int | None:
        """The new target replica count, or None to keep ``current``."""
        sources = self.sources.get(deployment_id, {})
        load = total_load((s.window for s in sources.values()), now_s, config.look_back_period_s)
        # A running replica that has not reported yet is assumed at target: missing data must
        # never read as idleness (and trigger a downscale).
        load += config.target_ongoing_requests * sum(1 for r in routable_ids if r not in sources)
        decider = self._deciders.setdefault(deployment_id, ScaleDecider())
        target = decider.decide(config, current, load, now_s)
        return target if target is not None and target != current else None


def look_back_s(goal: DeploymentGoal | None) -> float:
    auto = goal.spec.config.autoscaling_config if goal is not None else None
    return auto.look_back_period_s if auto is not None else DEFAULT_LOOK_BACK_S


def autoscale(
    autoscaler: Autoscaler, goal: DeploymentGoal, routable_ids: Collection[str], now_s: float
) -> None:
    """Move the goal's target replica count where the autoscaler says, if it says so now."""
    auto = goal.spec.config.autoscaling_config
    if auto is None or goal.failed:
        return
    target = autoscaler.decide(goal.deployment_id, auto, goal.target_replicas, routable_ids, now_s)
    if target is None:
        return
    logger.info(
        "Autoscaling %s from %d to %d replicas (target %.1f ongoing requests per replica)",
        goal.deployment_id,
        goal.target_replicas,
        target,
        auto.target_ongoing_requests,
    )
    goal.scaling = 1 if target > goal.target_replicas else -1
    goal.target_replicas = target
