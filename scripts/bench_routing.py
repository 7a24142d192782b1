"""Routing cost per request, with fake connections: does it grow with the number of replicas?

Runs a real Router and RoutingState in-process over N fake replicas (no network), keeping 64
requests in flight, and reports microseconds of routing work per request (queueing, power of two
choices, send, and completion bookkeeping).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from serve._exchange import Envelope
from serve._models import DeploymentID, ReplicaInfo, ReplicaSet
from serve._options import HandleOptions
from serve._request import Request
from serve._router import Router
from serve._routing_state import RoutingState
from serve._serialization import CLOUDPICKLE, encode

DEP = DeploymentID("Bench", "bench")
IN_FLIGHT = 64


class _FakeConnection:
    def __init__(self, replica: ReplicaInfo, on_load: Any, sent: collections.deque[Any]) -> None:
        self.replica_id = replica.replica_id
        self.broken = None
        self._on_load = on_load
        self._sent = sent
        self._next = 0

    def send(self, envelope: Envelope, listener: Any, request: Request) -> int:
        self._next += 1
        self._sent.append((self, listener, request, self._next))
        return self._next

    def answer(self, listener: Any, request: Request, frame_id: int, body: memoryview) -> None:
        self._on_load(0, frame_id)
        listener.on_result(request, body, None)

    def cancel(self, frame_id: int) -> None: ...

    def credit(self, frame_id: int, count: int, nbytes: int) -> None: ...

    async def queue_length(self, timeout_s: float) -> tuple[int, bool]:
        return 0, True

    async def aclose(self) -> None: ...


async def _measure(replicas: int, requests: int) -> float:
    sent: collections.deque[Any] = collections.deque()

    async def no_watch(deployment_id: DeploymentID) -> Any:
        return
        yield

    state = RoutingState(
        DEP,
        watch=no_watch,
        open_connection=lambda replica, on_load, on_broken: _FakeConnection(replica, on_load, sent),
    )

    class Source:
        def routing_state(self, deployment_id: DeploymentID) -> RoutingState:
            return state

    router = Router(Source(), DEP)
    state.apply(
        ReplicaSet(
            version=1,
            exists=True,
            replicas=tuple(
                ReplicaInfo(f"r{i}", f"addr{i}", max_ongoing_requests=1000) for i in range(replicas)
            ),
        )
    )
    options = HandleOptions()
    result = memoryview(encode(CLOUDPICKLE, None))
    started = time.perf_counter()
    for _ in range(requests):
        request = router.make_request(options, (), {})
        router.submit(request)
        if len(sent) >= IN_FLIGHT:
            conn, listener, done, frame_id = sent.popleft()
            conn.answer(listener, done, frame_id, result)
    while sent:
        conn, listener, done, frame_id = sent.popleft()
        conn.answer(listener, done, frame_id, result)
    return (time.perf_counter() - started) / requests * 1e6


def routing_cost_us(replicas: int, requests: int = 50_000) -> float:
    """Microseconds of routing work per request over ``replicas`` fake replicas."""
    return asyncio.run(_measure(replicas, requests))


if __name__ == "__main__":
    for n in (1, 8, 64):
        print(f"{n:>3} replicas: {routing_cost_us(n):.2f} us/request")
