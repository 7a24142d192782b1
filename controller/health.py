"""Health decisions, as a small pure decider: which replica to check now, what a result means.

Every running replica is checked every health_check_period_s. Three failures in a row (an error
from the user's ``check_health()``, or no answer within health_check_timeout_s) replace the
replica and mark its deployment UNHEALTHY with the reason, until one of its replicas passes a
check again. No I/O here: the supervisor makes the calls and reports their outcome.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

from controller.state import Phase, ReplicaRecord
from serve._models import Failure

UNHEALTHY_AFTER = 3  # consecutive failed health checks


class Health(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"  # failed, but not often enough in a row to act
    REPLACE = "replace"


@dataclasses.dataclass(frozen=True)
class HealthVerdict:
    health: Health
    reason: str = ""


class HealthPolicy(Protocol):
    """What the state machine asks about health; it never hands over its records' owner."""

    def due(self, record: ReplicaRecord, now_s: float) -> bool: ...

    def scheduled(self, record: ReplicaRecord, period_s: float, now_s: float) -> None: ...

    def judge(self, record: ReplicaRecord, failure: Failure | None) -> HealthVerdict: ...

    def forget(self, replica_id: str) -> None: ...


class HealthDecider:
    """The default policy: check when due, one check at a time, 3 misses in a row replace."""

    def __init__(self, unhealthy_after: int = UNHEALTHY_AFTER) -> None:
        self._unhealthy_after = unhealthy_after
        self._checking: set[str] = set()

    def due(self, record: ReplicaRecord, now_s: float) -> bool:
        return (
            record.phase is Phase.RUNNING
            and record.replica_id not in self._checking
            and now_s >= record.next_health_check_s
        )

    def scheduled(self, record: ReplicaRecord, period_s: float, now_s: float) -> None:
        """A check of ``record`` starts now; the next one is due a period later."""
        record.next_health_check_s = now_s + period_s
        self._checking.add(record.replica_id)

    def judge(self, record: ReplicaRecord, failure: Failure | None) -> HealthVerdict:
        """Count the outcome into ``record`` and say what it means."""
        self._checking.discard(record.replica_id)
        if failure is None:
            record.health_failures = 0
            return HealthVerdict(Health.PASSED)
        record.health_failures += 1
        if record.health_failures < self._unhealthy_after:
            return HealthVerdict(Health.FAILED, failure.message)
        return HealthVerdict(
            Health.REPLACE,
            f"Replica {record.replica_id} failed {record.health_failures} health checks in "
            f"a row and was replaced; last failure: {failure.message}",
        )

    def forget(self, replica_id: str) -> None:
        """A check's outcome no longer matters (the replica stopped or is gone)."""
        self._checking.discard(replica_id)
