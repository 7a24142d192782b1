"""Replica choice by power of two choices, and the numbers around it. Pure: no I/O, no asyncio.

The router asks :func:`choose` for a replica. Two distinct replicas are sampled; the one with the
shorter known queue below its ``max_ongoing_requests`` wins. Queue lengths are estimates kept by
:class:`QueueLengths`: the count the replica reported last (every reply carries it) plus the
requests sent to it since that have no answer yet. An unknown or expired estimate, or two full
candidates, make the router probe.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from serve._models import ReplicaInfo

R = TypeVar("R")

QUEUE_LENGTH_TTL_S: Final = 10.0
INITIAL_BACKOFF_S: Final = 0.025
BACKOFF_MULTIPLIER: Final = 2.0
MAX_BACKOFF_S: Final = 0.5
PROBE_DEADLINE_S: Final = 0.1
MAX_PROBE_DEADLINE_S: Final = 1.0


def backoff_s(
    failed_passes: int,
    *,
    initial_s: float = INITIAL_BACKOFF_S,
    multiplier: float = BACKOFF_MULTIPLIER,
    maximum_s: float = MAX_BACKOFF_S,
) -> float:
    """Sleep before the next pass: none after the first failure, then 25 ms doubling to 0.5 s."""
    if failed_passes <= 1:
        return 0.0
    exponent = failed_passes - 2
    if exponent > 64:  # no overflow for huge counts
        return maximum_s
    return float(min(initial_s * multiplier**exponent, maximum_s))


def probe_deadline_s(failed_passes: int) -> float:
    """Probe deadline: 100 ms, doubling with each failed pass, capped at 1 s."""
    if failed_passes > 16:
        return max(PROBE_DEADLINE_S, MAX_PROBE_DEADLINE_S)
    return float(
        min(PROBE_DEADLINE_S * 2**failed_passes, max(PROBE_DEADLINE_S, MAX_PROBE_DEADLINE_S))
    )


class QueueLengths:
    """Estimated ongoing requests per replica: the count the replica reported last, plus the
    requests this process sent it that it had not read yet when it counted.

    Frame ids grow per connection and the stream is ordered, so every reply says the highest
    frame id the replica had read (``acked``); requests with a higher frame id are certainly not
    in its count yet. A probe's answer carries no frame id and is counted as if it had read
    nothing new (an overestimate, never an underestimate).
    """

    __slots__ = ("_acked", "_reported", "_sent", "_ttl_s")

    def __init__(self, ttl_s: float = QUEUE_LENGTH_TTL_S) -> None:
        self._ttl_s = ttl_s
        self._reported: dict[str, tuple[int, float]] = {}
        self._sent: dict[str, int] = {}  # the highest frame id sent
        self._acked: dict[str, int] = {}  # the highest frame id the replica had read

    def report(self, replica_id: str, ongoing: int, now: float, acked: int | None = None) -> None:
        """The replica said how many requests it runs (in a reply or a probe answer)."""
        self._reported[replica_id] = (ongoing, now)
        if acked is not None and acked > self._acked.get(replica_id, 0):
            self._acked[replica_id] = acked

    def sent(self, replica_id: str, frame_id: int) -> None:
        if frame_id > self._sent.get(replica_id, 0):
            self._sent[replica_id] = frame_id

    def estimate(self, replica_id: str, now: float) -> int | None:
        """None when nothing fresh is known (the router should probe)."""
        reported = self._reported.get(replica_id)
        if reported is None or now - reported[1] > self._ttl_s:
            return None
        unread = self._sent.get(replica_id, 0) - self._acked.get(replica_id, 0)
        return reported[0] + max(unread, 0)

    def invalidate(self, replica_id: str) -> None:
        self._reported.pop(replica_id, None)

    def forget(self, replica_id: str) -> None:
        self._reported.pop(replica_id, None)
        self._sent.pop(replica_id, None)
        self._acked.pop(replica_id, None)

    def known(self) -> set[str]:
        return set(self._reported) | set(self._sent)


@dataclasses.dataclass(frozen=True, slots=True)
class Choice:
    """The outcome of one pass: a replica to send to (or None), and replicas worth probing."""

    replica: ReplicaInfo | None
    probe: tuple[ReplicaInfo, ...] = ()


def sample_two(candidates: Sequence[R], rng: random.Random) -> list[R]:
    """Two distinct replicas uniformly at random (the one, if there is one)."""
    n = len(candidates)
    if n <= 1:
        return list(candidates)
    i = rng.randrange(n)
    j = rng.randrange(n - 1)
    if j >= i:
        j += 1
    return [candidates[i], candidates[j]]


def choose(
    candidates: Sequence[ReplicaInfo],
    estimate: Callable[[str], int | None],
    rng: random.Random,
) -> Choice:
    """Power of two choices over ``candidates``.

    The sampled replica with the lowest estimate below its limit wins (ties go to the first
    sampled, which is random). Sampled replicas with unknown estimates are returned for probing;
    when no sampled replica is usable, the full ones are returned for probing too.
    """
    sampled = sample_two(candidates, rng)
    best: ReplicaInfo | None = None
    best_len = 0
    unknown: list[ReplicaInfo] = []
    full: list[ReplicaInfo] = []
    for replica in sampled:
        queue_len = estimate(replica.replica_id)
        if queue_len is None:
            unknown.append(replica)
        elif queue_len >= replica.max_ongoing_requests:
            full.append(replica)
        elif best is None or queue_len < best_len:
            best, best_len = replica, queue_len
    if best is not None:
        return Choice(best, tuple(unknown))
    return Choice(None, tuple(unknown + full))


def candidate_tiers(
    replicas: Sequence[ReplicaInfo],
    *,
    model_id: str = "",
    local_host: str = "",
    prefer_local: bool = False,
) -> list[Sequence[ReplicaInfo]]:
    """The candidate sets one routing pass tries, in order, without sleeping between them.

    With a multiplexed model id: the replicas holding (or loading) the model, then the replicas
    holding the fewest models, then all. Otherwise, with ``prefer_local``: the replicas on this
    host, then all. The last tier is always every replica, so a request that cannot be placed in
    one pass could not be placed by any other request either (the queue stays FIFO).
    """
    tiers: list[Sequence[ReplicaInfo]] = []
    if model_id:
        holding = [r for r in replicas if model_id in r.model_ids]
        if holding:
            tiers.append(holding)
        fewest = min((len(r.model_ids) for r in replicas), default=0)
        least_loaded = [r for r in replicas if len(r.model_ids) == fewest]
        if len(least_loaded) < len(replicas):
            tiers.append(least_loaded)
    elif prefer_local and local_host:
        local = [r for r in replicas if r.host == local_host]
        if local and len(local) < len(replicas):
            tiers.append(local)
    tiers.append(replicas)
    return tiers
