"""Replica sets as routers see them: one versioned snapshot per deployment, pushed on change."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from serve._models import DeploymentID, ReplicaInfo, ReplicaSet

if TYPE_CHECKING:
    from controller.reconciler import Controller


class Publisher:
    """Builds, versions and pushes each deployment's routable replica set to its watchers."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._published: dict[DeploymentID, ReplicaSet] = {}
        self._events: dict[DeploymentID, asyncio.Event] = {}
        # Versions keep increasing across controller restarts (routers compare them).
        self._versions = itertools.count(time.time_ns() // 1000)

    def forget(self, deployment_id: DeploymentID) -> None:
        self._published.pop(deployment_id, None)

    def snapshot(self, deployment_id: DeploymentID) -> ReplicaSet:
        goal = self._controller.goal(deployment_id)
        if goal is None:
            return ReplicaSet(version=next(self._versions), exists=False)
        config = goal.spec.config
        replicas = tuple(
            ReplicaInfo(
                replica_id=r.replica_id,
                address=r.address,
                host=r.host,
                max_ongoing_requests=r.max_ongoing_requests,
                model_ids=r.model_ids,
            )
            for r in sorted(self._controller.replicas.values(), key=lambda r: r.replica_id)
            if r.deployment_id == deployment_id and r.phase.routable
        )
        return ReplicaSet(
            version=next(self._versions),
            exists=True,
            replicas=replicas,
            max_queued_requests=config.max_queued_requests,
            max_ongoing_requests=config.max_ongoing_requests,
            autoscaling=config.autoscaling_config is not None,
            metrics_interval_s=(
                config.autoscaling_config.metrics_interval_s if config.autoscaling_config else 0.0
            ),
        )

    def publish(self, deployment_id: DeploymentID) -> None:
        snapshot = self.snapshot(deployment_id)
        previous = self._published.get(deployment_id)
        if previous is not None and _same(previous, snapshot):
            return
        self._published[deployment_id] = snapshot
        event = self._events.pop(deployment_id, None)
        if event is not None:
            event.set()

    def published_version(self, deployment_id: DeploymentID) -> int:
        """The version of the deployment's latest published replica set (0 if none)."""
        published = self._published.get(deployment_id)
        return published.version if published is not None else 0

    async def watch(self, deployment_id: DeploymentID) -> AsyncIterator[ReplicaSet]:
        """The deployment's replica set now, then every change, until cancelled."""
        await self._controller.recovered.wait()
        last: ReplicaSet | None = None
        while True:
            current = self._published.get(deployment_id)
            if current is None:
                current = self.snapshot(deployment_id)
                if current.exists:
                    self._published[deployment_id] = current
            if last is None or not _same(last, current):
                last = current
                yield current
                continue
            event = self._events.get(deployment_id)
            if event is None:
                event = self._events[deployment_id] = asyncio.Event()
            await event.wait()


def _same(a: ReplicaSet, b: ReplicaSet) -> bool:
    return (
        a.exists == b.exists
        and a.replicas == b.replicas
        and a.max_queued_requests == b.max_queued_requests
        and a.max_ongoing_requests == b.max_ongoing_requests
        and a.autoscaling == b.autoscaling
    )
