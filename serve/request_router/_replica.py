"""``RunningReplica``: one replica as a request router sees it (Ray's fields)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from serve._models import ReplicaID, ReplicaInfo

# (replica, deadline_s) -> its number of ongoing requests, asked over the network.
ProbeQueueLength = Callable[[ReplicaInfo, float], Awaitable[int]]


class RunningReplica:
    """A replica that can take requests: who and where it is, its load limits and its stats.

    ``routing_stats`` is what the replica's ``record_routing_stats()`` last returned (it
    reaches routers with the replica set, never with a request).
    """

    __slots__ = ("_info", "_probe", "_stats", "replica_id")

    def __init__(self, info: ReplicaInfo, probe: ProbeQueueLength | None = None) -> None:
        self._info = info
        self._probe = probe
        self._stats: dict[str, Any] | None = None
        self.replica_id = ReplicaID.parse(info.replica_id)

    @property
    def info(self) -> ReplicaInfo:
        return self._info

    @property
    def node_id(self) -> str:
        return self._info.host

    @property
    def node_ip(self) -> str:
        return self._info.address.rpartition(":")[0]

    @property
    def availability_zone(self) -> str | None:
        return None  # serve knows nodes, not zones

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return set(self._info.model_ids)

    @property
    def max_ongoing_requests(self) -> int:
        return self._info.max_ongoing_requests

    @property
    def is_cross_language(self) -> bool:
        return False

    @property
    def routing_stats(self) -> dict[str, Any]:
        if self._stats is None:
            raw = self._info.routing_stats_json
            self._stats = orjson.loads(raw) if raw else {}
        return self._stats

    async def get_queue_len(self, *, deadline_s: float) -> int:
        """Ask the replica how many requests it runs (within ``deadline_s``)."""
        if self._probe is None:
            raise RuntimeError(f"{self.replica_id!r} cannot be probed outside a router.")
        return await self._probe(self._info, deadline_s)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunningReplica) and other._info.replica_id == self._info.replica_id

    def __hash__(self) -> int:
        return hash(self._info.replica_id)

    def __repr__(self) -> str:
        return f"RunningReplica({self.replica_id!r})"
