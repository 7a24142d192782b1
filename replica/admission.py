"""Admission of requests a direct-ingress replica takes from its own clients (HTTP and gRPC).

Behind the proxy a caller's router queues requests; a client that talks to the replica itself
has no router, so the replica queues for it: ``max_ongoing_requests`` run at once (handle
calls and direct requests share the slots), up to ``max_queued_requests`` wait for one,
oldest first, and the rest are refused with ``BackPressureError`` (HTTP: the deployment's
backpressure status; gRPC: RESOURCE_EXHAUSTED), as Ray's direct ingress answers. One count of
waiting requests serves both protocols: the limit is the replica's.
"""

from __future__ import annotations

from replica.executor import Executor
from serve.exceptions import BackPressureError


class Admission:
    """Slots for direct requests: :meth:`enter` takes one (or raises), the caller releases it
    with ``executor.release()``."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self.queued = 0  # requests waiting for a slot now

    async def enter(self) -> None:
        """Take a slot, waiting for one if fewer than max_queued_requests already wait;
        BackPressureError otherwise."""
        executor = self._executor
        if executor.admit():
            return
        if not await self.wait():
            raise self.refused()

    async def wait(self) -> bool:
        """Wait for a slot, if fewer than max_queued_requests already wait (True: admitted)."""
        executor = self._executor
        limit = executor.config.max_queued_requests
        if limit != -1 and self.queued >= limit:
            return False
        self.queued += 1
        try:
            await executor.wait_admitted()
        finally:
            self.queued -= 1
        return True

    def refused(self) -> BackPressureError:
        config = self._executor.config
        backpressure = config.backpressure_config
        return BackPressureError(
            self.queued,
            config.max_queued_requests,
            backpressure.status_code if backpressure is not None else 503,
            backpressure.retry_after_s if backpressure is not None else None,
            deployment=str(self._executor.replica_id.deployment_id),
        )
