"""A custom request router (Ray's ``RequestRouter``): session affinity with a load-aware start.

Each chat session's requests go to one replica (its conversation cache lives there); a new
session goes to the replica reporting the fewest sessions in ``record_routing_stats()``, which
every router learns with the replica set, never with a request. If the session's replica goes
away, the session moves to another one. A Ray program would differ only in its imports.
Run it with ``python examples/custom_router.py``.
"""

import os
from typing import Any

import serve
from serve.config import RequestRouterConfig
from serve.request_router import PendingRequest, RequestRouter, RunningReplica


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, max_sessions: int = 1000) -> None:
        self.max_sessions = max_sessions
        self.sessions: dict[str, Any] = {}  # session -> the replica id it is pinned to

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        session = pending_request.kwargs.get("session", "") if pending_request else ""
        by_id = {r.replica_id: r for r in candidate_replicas}
        pinned = by_id.get(self.sessions.get(session))
        if pinned is not None:
            # The pinned replica first; the others (least loaded first) if it is full.
            return [[pinned], self._least_loaded(candidate_replicas)]
        chosen = self._least_loaded(candidate_replicas)[0]
        if len(self.sessions) < self.max_sessions:
            self.sessions[session] = chosen.replica_id
        return [[chosen]]

    def _least_loaded(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """By the sessions each replica reported, then by those pinned here since."""
        pinned_here = list(self.sessions.values())
        return sorted(
            replicas,
            key=lambda r: (r.routing_stats.get("sessions", 0), pinned_here.count(r.replica_id)),
        )


@serve.deployment(
    num_replicas=3,
    request_router_config=RequestRouterConfig(
        request_router_class=SessionAffinityRouter,
        request_router_kwargs={"max_sessions": 100},
        request_routing_stats_period_s=0.5,
    ),
)
class Chat:
    def __init__(self) -> None:
        self.histories: dict[str, list[str]] = {}

    def __call__(self, message: str, session: str) -> tuple[int, int]:
        history = self.histories.setdefault(session, [])
        history.append(message)
        return len(history), os.getpid()  # the history only grows if every turn lands here

    def record_routing_stats(self) -> dict[str, Any]:
        return {"sessions": len(self.histories)}


if __name__ == "__main__":
    handle = serve.run(Chat.bind())
    replicas = set()
    for session in ("ada", "grace", "edsger"):
        turns = [handle.remote(f"turn {i}", session=session).result() for i in range(5)]
        assert [n for n, _ in turns] == [1, 2, 3, 4, 5], turns  # one replica kept it all
        replicas.add(turns[0][1])
        print(f"session {session}: 5 turns on replica pid {turns[0][1]}")
    assert len(replicas) == 3  # new sessions went to the least loaded replica
    serve.shutdown()
    print("custom router example OK")
