"""Replica sets as routers see them: one versioned snapshot per deployment, pushed on change.

Nobody asks for a publication: after each step of the state machine the supervisor hands over
every deployment's current set (``update``), and whatever differs from what was last published
gets a new version and wakes its watchers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncGenerator, Mapping

from serve._models import DeploymentID, ReplicaSet


def changed(a: ReplicaSet, b: ReplicaSet) -> bool:
    """Whether routers must hear of ``b`` after ``a`` (the version aside)."""
    return (
        a.exists != b.exists
        or a.replicas != b.replicas
        or a.max_queued_requests != b.max_queued_requests
        or a.max_ongoing_requests != b.max_ongoing_requests
        or a.autoscaling != b.autoscaling
        or a.unavailable != b.unavailable
        or a.backpressure != b.backpressure
    )


class Publisher:
    """Versions and pushes each deployment's routable replica set to its watchers."""

    def __init__(self) -> None:
        self._published: dict[DeploymentID, ReplicaSet] = {}
        self._events: dict[DeploymentID, asyncio.Event] = {}
        self._open = asyncio.Event()
        # Versions keep increasing across controller restarts (routers compare them).
        self._versions = itertools.count(time.time_ns() // 1000)

    def update(self, current: Mapping[DeploymentID, ReplicaSet]) -> None:
        """Publish what differs from the last publication; watchers may start once called."""
        for deployment_id, replica_set in current.items():
            previous = self._published.get(deployment_id)
            if previous is None or changed(previous, replica_set):
                self._publish(deployment_id, replica_set)
        for deployment_id, previous in list(self._published.items()):
            if deployment_id not in current and previous.exists:
                self._publish(deployment_id, ReplicaSet(version=0, exists=False))
        self._open.set()

    def _publish(self, deployment_id: DeploymentID, replica_set: ReplicaSet) -> None:
        self._published[deployment_id] = dataclasses.replace(
            replica_set, version=next(self._versions)
        )
        event = self._events.pop(deployment_id, None)
        if event is not None:
            event.set()

    def published_version(self, deployment_id: DeploymentID) -> int:
        """The version of the deployment's latest published replica set (0 if none)."""
        published = self._published.get(deployment_id)
        return published.version if published is not None else 0

    async def watch(self, deployment_id: DeploymentID) -> AsyncGenerator[ReplicaSet, None]:
        """The deployment's replica set now, then every change, until cancelled."""
        await self._open.wait()
        last: ReplicaSet | None = None
        while True:
            current = self._published.get(deployment_id)
            if current is None:
                current = ReplicaSet(version=next(self._versions), exists=False)
            if last is None or changed(last, current):
                last = current
                yield current
                continue
            event = self._events.get(deployment_id)
            if event is None:
                event = self._events[deployment_id] = asyncio.Event()
            await event.wait()
