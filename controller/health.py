"""Health checks: every running replica is checked every health_check_period_s.

Three failures in a row (an error from the user's ``check_health()``, or no answer within
health_check_timeout_s) replace the replica and mark its deployment UNHEALTHY with the reason,
until one of its replicas passes a check again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from controller.state import DeploymentGoal, Phase, ReplicaRecord
from serve._models import Failure
from serve._rpc.replica_client import ReplicaUnreachable

if TYPE_CHECKING:
    from controller.reconciler import Controller

logger = logging.getLogger(__name__)

HEALTH_TICK_S = 0.1
UNHEALTHY_AFTER = 3  # consecutive failed health checks


class HealthChecker:
    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._checking: set[str] = set()

    async def run(self) -> None:
        """Check each running replica every health_check_period_s (its deployment's)."""
        while True:
            await asyncio.sleep(HEALTH_TICK_S)
            now = time.monotonic()
            for record in list(self._controller.replicas.values()):
                if (
                    record.phase is not Phase.RUNNING
                    or record.replica_id in self._checking
                    or now < record.next_health_check_s
                ):
                    continue
                goal = self._controller.goal(record.deployment_id)
                if goal is None:
                    continue
                config = goal.spec.config
                record.next_health_check_s = now + config.health_check_period_s
                self._checking.add(record.replica_id)
                self._controller.spawn(
                    self._check(record, goal, config.health_check_timeout_s),
                    f"controller:health:{record.replica_id}",
                )

    async def _check(self, record: ReplicaRecord, goal: DeploymentGoal, timeout_s: float) -> None:
        try:
            failure = await self._controller.client_for(record).check_health(timeout_s)
        except ReplicaUnreachable as exc:
            failure = Failure(str(exc))
        finally:
            self._checking.discard(record.replica_id)
        if (
            self._controller.replicas.get(record.replica_id) is not record
            or not record.phase.routable
        ):
            return
        if failure is None:
            record.health_failures = 0
            if goal.unhealthy_reason:
                goal.unhealthy_reason = ""
                self._controller.changed()
            return
        record.health_failures += 1
        logger.warning(
            "Replica %s failed a health check (%d in a row): %s",
            record.replica_id,
            record.health_failures,
            failure.message,
        )
        if record.health_failures >= UNHEALTHY_AFTER:
            goal.unhealthy_reason = (
                f"Replica {record.replica_id} failed {record.health_failures} health checks in "
                f"a row and was replaced; last failure: {failure.message}"
            )
            self._controller.begin_stop(record)
