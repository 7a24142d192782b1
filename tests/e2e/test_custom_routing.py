"""Custom request routers (Ray's RequestRouter) through real daemons: where they run (driver,
replica, proxy), the stats they see, a replica dying under them, and a router that fails."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import httpx
import pytest

import serve
from serve._context import request_deadline
from serve.config import RequestRouterConfig
from serve.exceptions import RequestCancelledError, RequestTimeoutError
from tests.support.apps import Signal
from tests.support.extensions import FlakyRouter, Front, LowestRankRouter, Sticky, StickyRouter
from tests.support.procs import pids_alive, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]

SESSIONS = ["alice", "bob", "carol", "dave", "erin", "frank"]


def pins(call: Any) -> dict[str, set[int]]:
    """Which pids answered each session, over a few calls each."""
    return {s: {call(s) for _ in range(6)} for s in SESSIONS}


def spread_pins(call: Any, rounds: int = 10) -> dict[str, set[int]]:
    """``pins`` for routers whose view of the replicas may still be filling in (a replica's or
    a proxy's router learns them from the controller after ``serve.run`` returns): fresh
    session names each round until the sessions land on more than one replica."""
    seen: dict[str, set[int]] = {}
    for n in range(rounds):
        seen = pins(lambda s, n=n: call(f"{s}-{n}"))
        assert all(len(pids) == 1 for pids in seen.values()), seen
        if len(set().union(*seen.values())) > 1:
            break
    return seen


def test_a_router_pins_each_session_to_one_replica_and_moves_it_when_that_replica_dies() -> None:
    h = serve.run(Sticky.bind(), name="sticky", route_prefix=None)
    before = pins(lambda s: h.remote(session=s).result(timeout_s=30))
    assert all(len(pids) == 1 for pids in before.values()), before
    assert len(set().union(*before.values())) > 1  # sessions spread over the replicas
    victim = next(iter(before["alice"]))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not pids_alive([victim]), timeout_s=10)
    # The router drops the dead replica at once; alice's requests go to another one, and stay.
    survivors: list[int] = []
    for _ in range(12):
        try:
            survivors.append(h.remote(session="alice").result(timeout_s=30))
        except serve.exceptions.ReplicaDiedError:
            pass  # a request already written to the killed replica (never re-run)
    assert victim not in survivors
    assert len(set(survivors[-6:])) == 1, survivors
    wait_for(
        lambda: (
            serve.status().applications["sticky"].deployments["Sticky"].replica_states
            == {"RUNNING": 3}
        ),
        timeout_s=30,
    )
    after = pins(lambda s: h.remote(session=s).result(timeout_s=30))
    assert all(len(pids) == 1 for pids in after.values()), after
    for session in SESSIONS:  # sessions on the surviving replicas never moved
        if before[session] != {victim}:
            assert after[session] == before[session]


def test_the_router_runs_inside_replicas_too() -> None:
    h = serve.run(Front.bind(Sticky.bind()), name="front", route_prefix=None)
    seen = spread_pins(lambda s: h.remote(s).result(timeout_s=30))
    assert len(set().union(*seen.values())) > 1, seen


def test_the_router_runs_in_the_http_proxy(http_url: str) -> None:
    serve.run(Sticky.bind(), name="sticky-http", route_prefix="/sticky")

    def call(session: str) -> int:
        reply = httpx.get(f"{http_url}/sticky", headers={"x-session": session}, timeout=30)
        assert reply.status_code == 200, reply.text
        return int(reply.text)

    seen = spread_pins(call)
    assert len(set().union(*seen.values())) > 1, seen


@serve.deployment(
    num_replicas=3,
    request_router_config=RequestRouterConfig(
        request_router_class=LowestRankRouter, request_routing_stats_period_s=0.2
    ),
)
class Ranked:
    def __call__(self) -> int:
        rank = serve.get_replica_context().rank
        assert rank is not None
        return rank.rank

    def record_routing_stats(self) -> dict[str, Any]:
        rank = serve.get_replica_context().rank
        return {"rank": rank.rank if rank is not None else 99}


def test_routers_see_what_replicas_report_in_record_routing_stats() -> None:
    h = serve.run(Ranked.bind(), name="ranked", route_prefix=None)
    # Once every replica's stats have reached this process (with the replica set, not with
    # requests), everything goes to rank 0.
    wait_for(lambda: {h.remote().result(timeout_s=30) for _ in range(10)} == {0}, timeout_s=30)


@serve.deployment(num_replicas=2, request_router_config={"request_router_class": FlakyRouter})
class Flaky:
    def __call__(self, session: str = "") -> str:
        return session


def test_a_router_that_fails_falls_back_to_the_default_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = serve.run(Flaky.bind(), name="flaky", route_prefix=None)
    with caplog.at_level(logging.WARNING, logger="serve._custom_routing"):
        assert [h.remote(session=s).result(timeout_s=30) for s in ("ok", "boom", "garbage")] == [
            "ok",
            "boom",
            "garbage",
        ]
        assert h.remote(session="ok").result(timeout_s=30) == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "serve._custom_routing"]
    assert any(
        "Custom request router of flaky.Flaky failed" in line
        and "ValueError: this router cannot route boom" in line
        and "Routing by power of two choices instead" in line
        for line in lines
    ), lines


@serve.deployment(
    max_ongoing_requests=1, request_router_config={"request_router_class": StickyRouter}
)
class Gated:
    def __init__(self, signal: Any) -> None:
        self._signal = signal

    async def __call__(self, session: str = "") -> str:
        if session == "hold":
            await self._signal.wait.remote()
        return session


def test_requests_waiting_on_a_custom_router_can_be_cancelled_or_time_out() -> None:
    serve.run(Signal.bind(), name="custom-gate", route_prefix=None)
    gate = serve.get_app_handle("custom-gate")
    h = serve.run(Gated.bind(gate), name="gated", route_prefix=None)
    held = h.remote(session="hold")
    wait_for(lambda: gate.num_waiters.remote().result() == 1)
    # The only replica is full: these wait in the router, backing off between passes.
    cancelled = h.remote(session="a")
    with request_deadline(0.5):
        late = h.remote(session="b")
    cancelled.cancel()
    with pytest.raises(RequestCancelledError):
        cancelled.result(timeout_s=30)
    with pytest.raises(RequestTimeoutError):
        late.result(timeout_s=30)
    gate.send.remote().result()
    assert held.result(timeout_s=30) == "hold"
    assert h.remote(session="c").result(timeout_s=30) == "c"  # the router still routes
