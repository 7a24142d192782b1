"""The router's queue and choices, driven with fake connections: no sockets, no processes."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from serve._context import (
    RequestContext,
    request_deadline,
    reset_current_request,
    set_current_request,
)
from serve._exchange import ConnectionLost, Envelope, ReplyListener
from serve._models import DeploymentID, ReplicaInfo, ReplicaSet
from serve._options import HandleOptions
from serve._request import Request, RequestState
from serve._router import Router
from serve._routing_state import RoutingState
from serve._serialization import CLOUDPICKLE, encode
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
    RequestTimeoutError,
)

DEP = DeploymentID("Model", "app")


class FakeConnection:
    """A ``Connection`` that records what is sent; tests play the replica's answers through
    ``answer``."""

    def __init__(
        self,
        replica: ReplicaInfo,
        on_load: Callable[[int, int], None],
        on_broken: Callable[[Any, ConnectionLost], None],
    ) -> None:
        self.replica_id = replica.replica_id
        self.on_load = on_load
        self.on_broken = on_broken
        self.broken: ConnectionLost | None = None
        self.sent: dict[int, tuple[ReplyListener, Request, Envelope]] = {}
        self.reservations: dict[int, tuple[ReplyListener, Request]] = {}
        self.released: list[int] = []
        self.cancelled: list[int] = []
        self.fed: list[tuple[int, bytes]] = []
        self.probe_answer: tuple[int, bool] | None = (0, True)
        self.probes = 0
        self.history: list[Request] = []
        self._ids = itertools.count(1)

    def send(
        self,
        envelope: Envelope,
        listener: ReplyListener,
        request: Request,
        reservation_frame_id: int = 0,
    ) -> int:
        if self.broken is not None:
            raise self.broken
        frame_id = reservation_frame_id or next(self._ids)
        self.reservations.pop(frame_id, None)
        self.sent[frame_id] = (listener, request, envelope)
        self.history.append(request)
        return frame_id

    def reserve(self, listener: ReplyListener, request: Request) -> int:
        if self.broken is not None:
            raise self.broken
        frame_id = next(self._ids)
        self.reservations[frame_id] = (listener, request)
        return frame_id

    def release(self, frame_id: int) -> None:
        self.reservations.pop(frame_id, None)
        self.released.append(frame_id)

    def cancel(self, frame_id: int) -> None:
        self.cancelled.append(frame_id)

    def feed(self, frame_id: int, payload: bytes) -> None:
        self.fed.append((frame_id, payload))

    def credit(self, frame_id: int, count: int, nbytes: int) -> None:
        pass

    async def queue_length(self, timeout_s: float) -> tuple[int, bool]:
        self.probes += 1
        if self.probe_answer is None:
            raise TimeoutError
        return self.probe_answer

    async def aclose(self) -> None:
        pass

    def calls(self) -> list[Request]:
        """Every request sent on this connection, answered or not."""
        return list(self.history)

    def answer(self, request: Request, ongoing: int, method: str, *args: Any) -> None:
        """The replica answers ``request`` having read every request sent so far."""
        listener, _, _ = self.sent.pop(frame_of(request))
        self.on_load(ongoing, max([frame_of(request), *self.sent]))
        getattr(listener, method)(request, *args)

    def break_(self, *, written: bool) -> None:
        self.broken = ConnectionLost("gone")
        sent, self.sent = self.sent, {}
        for listener, request, _ in sent.values():
            listener.on_lost(request, self.broken, written)
        self.on_broken(self, self.broken)


class Fixture:
    def __init__(self) -> None:
        self.conns: dict[str, FakeConnection] = {}
        self.state = RoutingState(
            DEP, watch=self._no_watch, open_connection=self._open, local_host="me"
        )
        self.router = Router(self, DEP)

    async def _no_watch(self, deployment_id: DeploymentID) -> Any:
        raise AssertionError("tests feed replica sets directly")
        yield

    def _open(
        self,
        replica: ReplicaInfo,
        on_load: Callable[[int, int], None],
        on_broken: Callable[[Any, ConnectionLost], None],
    ) -> FakeConnection:
        conn = self.conns[replica.replica_id] = FakeConnection(replica, on_load, on_broken)
        return conn

    def routing_state(self, deployment_id: DeploymentID) -> RoutingState:
        return self.state

    def publish(self, *replicas: ReplicaInfo, max_queued: int = -1) -> None:
        self.state.apply(
            ReplicaSet(version=1, exists=True, replicas=replicas, max_queued_requests=max_queued)
        )

    def call(self, *args: Any, options: HandleOptions | None = None) -> Request:
        request = self.router.make_request(options or HandleOptions(), args, {})
        self.router.submit(request)
        return request

    def result(self, request: Request, value: Any, ongoing: int = 0) -> None:
        body = memoryview(encode(CLOUDPICKLE, value))
        self.conns[replica_of(request)].answer(request, ongoing, "on_result", body, None)

    def reject(self, request: Request, ongoing: int, draining: bool = False) -> None:
        self.conns[replica_of(request)].answer(request, ongoing, "on_rejected", draining)


def replica_of(request: Request) -> str:
    """The replica of the request's current (or last) attempt."""
    assert request.attempt is not None
    return request.attempt.replica.replica_id


def frame_of(request: Request) -> int:
    """The frame id of the request's current (or last) attempt."""
    assert request.attempt is not None
    return request.attempt.frame_id


def replica(
    name: str, limit: int = 5, models: set[str] | None = None, host: str = ""
) -> ReplicaInfo:
    return ReplicaInfo(name, f"addr-{name}", host, limit, frozenset(models or ()))


@pytest.fixture
def f() -> Fixture:
    return Fixture()


async def test_requests_wait_without_replicas_then_go_to_the_first_one(f: Fixture) -> None:
    calls = [f.call(i) for i in range(3)]
    assert all(c.state == RequestState.QUEUED for c in calls)
    assert not f.conns
    f.publish(replica("a"))
    assert [c.state for c in calls] == [RequestState.SENT] * 3
    f.result(calls[0], "done")
    assert await calls[0].completion.wait() == "done"


async def test_fifo_when_the_only_replica_takes_one_at_a_time(f: Fixture) -> None:
    f.publish(replica("a", limit=1))
    calls = [f.call(i) for i in range(4)]
    conn = f.conns["a"]
    for expected in range(4):
        assert [c.seq for c in conn.calls()][-1] == calls[expected].seq
        f.result(calls[expected], expected)
    assert [c.completion.outcome() for c in calls] == [0, 1, 2, 3]


async def test_a_rejected_request_keeps_its_place_in_the_queue(f: Fixture) -> None:
    f.publish(replica("a", limit=1), replica("b", limit=1))
    first, second, third = f.call(1), f.call(2), f.call(3)
    assert third.state == RequestState.QUEUED
    first_replica = replica_of(first)
    f.reject(first, 1)  # another router filled that replica first
    assert first.state == RequestState.QUEUED
    other = replica_of(second)
    assert other != first_replica
    f.result(second, "b")
    # The freed replica takes the rejected (older) request, not the third.
    assert first.state == RequestState.SENT
    assert replica_of(first) == other
    assert third.state == RequestState.QUEUED


async def test_backpressure_at_max_queued_requests(f: Fixture) -> None:
    f.publish(replica("a", limit=1), max_queued=2)
    running = f.call(0)  # sent: no longer queued
    queued = [f.call(1), f.call(2)]
    with pytest.raises(BackPressureError) as info:
        f.call(3)
    assert info.value.num_queued_requests == 2
    assert info.value.max_queued_requests == 2
    assert "num_queued_requests=2, max_queued_requests=2" in str(info.value)
    f.result(running, "x")  # the replica is free again: the oldest queued request is sent
    assert queued[0].state == RequestState.SENT
    f.call(4)


async def test_the_shorter_queue_wins(f: Fixture) -> None:
    f.publish(replica("a"), replica("b"))
    f.state.queue_lens.report("a", 4, now=_now())
    f.state.queue_lens.report("b", 0, now=_now())
    calls = [f.call(i) for i in range(4)]
    assert [replica_of(c) for c in calls] == ["b", "b", "b", "b"]  # b: 0,1,2,3 unanswered < 4
    assert replica_of(f.call(5)) in ("a", "b")


async def test_unknown_load_is_probed_then_used(f: Fixture) -> None:
    f.publish(replica("a"))
    f.state.queue_lens.forget("a")
    call = f.call(1)
    assert call.state == RequestState.QUEUED
    await _until(lambda: call.state == RequestState.SENT)
    assert f.conns["a"].probes == 1


async def test_full_replicas_are_probed_with_backoff_until_one_frees(f: Fixture) -> None:
    f.publish(replica("a", limit=1))
    f.state.queue_lens.report("a", 1, now=_now())  # full according to the last answer
    f.conns.clear()
    f.state.connection(replica("a", limit=1)).probe_answer = (1, True)  # type: ignore[attr-defined]
    call = f.call(1)
    await asyncio.sleep(0.2)
    probes = f.conns["a"].probes
    assert call.state == RequestState.QUEUED
    assert 2 <= probes <= 8  # backoff: 0, 25, 50, 100 ms ...
    f.conns["a"].probe_answer = (0, True)
    await _until(lambda: call.state == RequestState.SENT, timeout_s=2)


async def test_loss_before_writing_retries_elsewhere(f: Fixture) -> None:
    f.publish(replica("a", limit=1), replica("b", limit=1))
    first, second = f.call(1), f.call(2)
    lost = f.conns[replica_of(first)]
    survivor = "b" if replica_of(first) == "a" else "a"
    f.result(second, "ok") if replica_of(second) == survivor else None
    lost.break_(written=False)
    assert replica_of(first) == survivor
    assert first.state == RequestState.SENT
    assert f.state.routable == [r for r in f.state.routable if r.replica_id == survivor]


async def test_loss_after_writing_is_replica_died_and_never_retried(f: Fixture) -> None:
    f.publish(replica("a"), replica("b"))
    call = f.call(1)
    f.conns[replica_of(call)].break_(written=True)
    assert call.state == RequestState.DONE
    with pytest.raises(ReplicaDiedError, match="was not retried"):
        await call.completion.wait()


async def test_cancel_while_queued_never_sends(f: Fixture) -> None:
    f.publish(replica("a", limit=1))
    busy, queued = f.call(1), f.call(2)
    f.router.cancel(queued)
    with pytest.raises(RequestCancelledError):
        await queued.completion.wait()
    f.result(busy, "x")
    assert [c.seq for c in f.conns["a"].calls()] == [busy.seq]


async def test_cancel_after_sending_tells_the_replica(f: Fixture) -> None:
    f.publish(replica("a"))
    call = f.call(1)
    f.router.cancel(call)
    assert f.conns["a"].cancelled == [frame_of(call)]
    with pytest.raises(RequestCancelledError):
        await call.completion.wait()
    # the replica's late answer
    f.conns["a"].answer(call, 0, "on_error", asyncio.CancelledError(), True)
    assert f.state.queue_lens.estimate("a", _now()) == 0


async def test_a_draining_replica_is_skipped_at_once(f: Fixture) -> None:
    f.publish(replica("a"), replica("b"))
    call = f.call(1)
    draining = replica_of(call)
    f.reject(call, 0, draining=True)
    assert replica_of(call) != draining
    assert [r.replica_id for r in f.state.routable] == [replica_of(call)]


async def test_a_deleted_deployment_fails_waiting_requests(f: Fixture) -> None:
    call = f.call(1)
    f.state.apply(ReplicaSet(version=2, exists=False))
    with pytest.raises(DeploymentUnavailableError):
        await call.completion.wait()
    with pytest.raises(DeploymentUnavailableError):
        await f.call(2).completion.wait()


async def test_multiplexed_requests_go_to_replicas_holding_the_model(f: Fixture) -> None:
    f.publish(replica("a", models={"m1"}), replica("b", models={"m2"}), replica("c"))
    options = HandleOptions(multiplexed_model_id="m2")
    assert {replica_of(f.call(i, options=options)) for i in range(4)} == {"b"}
    fresh = HandleOptions(multiplexed_model_id="new")
    assert replica_of(f.call(9, options=fresh)) == "c"  # the replica with the fewest models


async def test_busy_model_replicas_spill_to_the_fewest_models(f: Fixture) -> None:
    f.publish(
        replica("a", limit=1, models={"m"}),
        replica("b", limit=1),
        replica("c", limit=1, models={"x", "y"}),
    )
    options = HandleOptions(multiplexed_model_id="m")
    first, second = f.call(1, options=options), f.call(2, options=options)
    assert (replica_of(first), replica_of(second)) == ("a", "b")


async def test_prefer_local_routing(f: Fixture) -> None:
    f.publish(replica("far", host="other"), replica("near", host="me"))
    options = HandleOptions(prefer_local_routing=True)
    assert {replica_of(f.call(i, options=options)) for i in range(5)} == {"near"}


async def test_no_work_is_scheduled_when_idle(f: Fixture) -> None:
    f.publish(replica("a"))
    call = f.call(1)
    f.result(call, 1)
    assert f.router._retry_timer is None
    assert not f.state._probing
    assert not f.router._pending


def _now() -> float:
    import time

    return time.monotonic()


async def _until(predicate: Any, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# Deadlines.


def test_nested_deadline_scopes_keep_the_earlier_deadline() -> None:
    with request_deadline(10) as outer:
        with request_deadline(100) as later:
            assert later == outer
        with request_deadline(1) as earlier:
            assert 0 < earlier < outer
        with request_deadline(None) as unchanged:
            assert unchanged == outer
    with request_deadline(None) as none:
        assert none == 0.0
    with pytest.raises(ValueError, match="NaN"), request_deadline(float("nan")):
        pass


async def test_the_deadline_is_captured_when_the_request_is_made(f: Fixture) -> None:
    f.publish(replica("a"))
    with request_deadline(30) as deadline_s:
        request = f.router.make_request(HandleOptions(), (1,), {})
    plain = f.call(2)
    f.router.submit(request)  # later, outside the scope (as on the IO thread)
    assert request.envelope.deadline_s == deadline_s
    assert f.conns["a"].sent[frame_of(request)][2].deadline_s == deadline_s
    assert plain.envelope.deadline_s == 0.0
    assert plain.deadline_timer is None
    f.result(request, "ok")
    assert await request.completion.wait() == "ok"
    assert request.deadline_timer is None  # its timer went with it


async def test_a_request_made_past_its_deadline_fails_at_once_without_queueing(
    f: Fixture,
) -> None:
    f.publish(replica("a"), max_queued=1)
    with request_deadline(0), pytest.raises(RequestTimeoutError) as info:
        f.call(1, options=HandleOptions(method_name="predict"))
    assert "'app.Model' (predict)" in str(info.value)
    assert "already passed" in str(info.value)
    assert f.router.num_queued == 0
    assert not f.conns  # nothing was sent anywhere


async def test_a_request_waiting_for_replicas_fails_when_its_deadline_passes(
    f: Fixture,
) -> None:
    with request_deadline(0.05):
        waiting = f.call(1)
    plain = f.call(2)
    assert waiting.state == RequestState.QUEUED
    with pytest.raises(RequestTimeoutError) as info:
        await asyncio.wait_for(waiting.completion.wait(), 5)
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout_s == pytest.approx(0.05, abs=0.02)
    assert f.router.num_queued == 1  # only the request without a deadline still waits
    f.publish(replica("a"))
    assert [c.request_id for c in f.conns["a"].calls()] == [plain.request_id]


async def test_a_request_queued_behind_full_replicas_fails_at_its_deadline(f: Fixture) -> None:
    f.publish(replica("a", limit=1))
    running = f.call(0)
    f.conns["a"].probe_answer = (1, True)
    with request_deadline(0.05):
        queued = f.call(1)
    assert queued.state == RequestState.QUEUED
    with pytest.raises(RequestTimeoutError):
        await asyncio.wait_for(queued.completion.wait(), 5)
    f.result(running, "done")  # the replica frees up: the expired request is not sent
    assert [c.request_id for c in f.conns["a"].calls()] == [running.request_id]
    assert f.router.num_queued == 0


async def test_a_sent_request_fails_at_its_deadline_and_is_never_retried(f: Fixture) -> None:
    f.publish(replica("a", limit=1), replica("b", limit=1))
    with request_deadline(0.05):
        sent = f.call(1)
    assert sent.state == RequestState.SENT
    conn = f.conns[replica_of(sent)]
    with pytest.raises(RequestTimeoutError):
        await asyncio.wait_for(sent.completion.wait(), 5)
    # The replica ends the work itself (it got the time left): no CANCEL from here.
    assert conn.cancelled == []
    f.reject(sent, 0)  # a late rejection does not send it again, anywhere
    assert sum(len(c.calls()) for c in f.conns.values()) == 1
    assert sent.state == RequestState.DONE


async def test_a_rejected_request_past_its_deadline_is_not_retried(f: Fixture) -> None:
    f.publish(replica("a", limit=1), replica("b", limit=1))
    with request_deadline(30):
        sent = f.call(1)
    assert sent.deadline_timer is not None
    sent.envelope.deadline_s = _now() - 1  # it passed while the replica considered it
    f.reject(sent, 1)
    assert sent.state == RequestState.DONE
    with pytest.raises(RequestTimeoutError):
        sent.completion.outcome()
    assert sum(len(c.calls()) for c in f.conns.values()) == 1


async def test_children_expired_by_their_replica_fail_with_the_timeout(f: Fixture) -> None:
    f.publish(replica("a"))
    parent = RequestContext(request_id="parent")
    token = set_current_request(parent)
    try:
        with request_deadline(30):  # as a replica sets it for the request it serves
            child = f.call(1)
    finally:
        reset_current_request(token)
    assert parent.children == {child}
    timer = child.deadline_timer
    assert timer is not None
    child.expire()
    with pytest.raises(RequestTimeoutError):
        child.completion.outcome()
    assert timer.cancelled()  # its own timer has nothing left to do
    assert not child.cancelled
    assert parent.children == set()
    assert f.conns["a"].cancelled == []  # its replica has the deadline too and ends it itself


def test_request_timeout_error_survives_pickling_and_names_what_timed_out() -> None:
    import pickle

    error = RequestTimeoutError(deployment="app.Model", method="predict", timeout_s=0.5)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RequestTimeoutError
    assert (copy.deployment, copy.method, copy.timeout_s) == ("app.Model", "predict", 0.5)
    assert str(copy) == str(error)
    assert "'app.Model' (predict) timed out after 0.5s" in str(error)
    assert isinstance(copy, TimeoutError)
