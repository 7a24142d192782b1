"""The Connect stream between a real ReplicaConnection and a real replica servicer (in process).

Admission, rejection, draining, cancellation, flow control and malformed input, frame by frame.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cloudpickle
import grpc
import grpc.aio
import pytest

from replica.executor import Executor
from replica.servicer import ReplicaServicer, register
from serve._context import set_replica_context
from serve._exchange import ConnectionLost, Envelope
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec, ReplicaID
from serve._rpc.channel import new_server
from serve._rpc.connection import ReplicaConnection
from serve._serialization import CLOUDPICKLE, decode, encode_args

TOKEN = "component-token"
replica_servers: dict[str, grpc.aio.Server] = {}


class Target:
    def __init__(self) -> None:
        self.cancelled = 0
        self.gate = asyncio.Event()
        self.thread_gate = threading.Event()
        self.produced = 0

    async def wait(self) -> str:
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "opened"

    def block(self) -> str:
        self.thread_gate.wait(10)
        return "unblocked"

    async def echo(self, value: Any) -> Any:
        return value

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            self.produced += 1
            yield i

    async def blobs(self, n: int, size: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            self.produced += 1
            yield b"x" * size


class Recorder:
    """A ReplyListener that records what the connection reports about its one request."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.done = asyncio.Event()
        self.items: list[Any] = []
        self.inputs_read: list[tuple[int, int]] = []

    def on_rejected(self, request: Any, draining: bool) -> None:
        self.events.append(("rejected", draining))
        self.done.set()

    def on_reserved(self, request: Any) -> None:
        self.events.append(("reserved", None))
        self.done.set()

    def on_result(self, request: Any, body: memoryview, buffers: list[bytes] | None) -> None:
        self.events.append(("result", decode(CLOUDPICKLE, body, buffers)))
        self.done.set()

    def on_error(self, request: Any, error: BaseException, cancelled: bool) -> None:
        self.events.append(("error", (type(error).__name__, cancelled)))
        self.done.set()

    def on_item(self, request: Any, body: memoryview, buffers: list[bytes] | None) -> None:
        self.items.append(decode(CLOUDPICKLE, body, buffers))

    def on_input_read(self, request: Any, count: int, nbytes: int) -> None:
        self.inputs_read.append((count, nbytes))

    def on_end(self, request: Any) -> None:
        self.events.append(("end", None))
        self.done.set()

    def on_lost(self, request: Any, error: ConnectionLost, written: bool) -> None:
        self.events.append(("lost", (error.retryable, written)))
        self.done.set()

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


@pytest.fixture(autouse=True)
def _no_replica_context() -> Iterator[None]:
    yield
    set_replica_context(None)


@pytest.fixture
async def replica() -> AsyncIterator[tuple[Executor, str]]:
    executor = Executor(ReplicaID("t1", DeploymentID("Target", "component")))
    spec = DeploymentSpec(
        "Target",
        cloudpickle.dumps(Target),
        cloudpickle.dumps(((), {})),
        "v1",
        DeploymentConfig(max_ongoing_requests=2),
    )
    await executor.initialize(spec, CodeEnv("", ()))
    server, port = new_server(TOKEN, None, "127.0.0.1", 0)
    register(server, ReplicaServicer(executor, on_stop=lambda timeout_s: 0))
    await server.start()
    address = f"127.0.0.1:{port}"
    replica_servers[address] = server
    try:
        yield executor, address
    finally:
        del replica_servers[address]
        await server.stop(0)


def _connect(
    address: str,
    broken: list[ConnectionLost] | None = None,
    loads: list[tuple[int, int]] | None = None,
    replica_id: str = "component#Target#t1",
) -> ReplicaConnection:
    return ReplicaConnection(
        replica_id,
        address,
        token=TOKEN,
        tls=None,
        on_load=lambda ongoing, acked: (
            loads.append((ongoing, acked)) if loads is not None else None
        ),
        on_broken=lambda conn, error: broken.append(error) if broken is not None else None,
    )


def _send(conn: ReplicaConnection, exchange: Recorder, method: str, *args: Any, **kw: Any) -> int:
    stream = kw.pop("_stream", False)
    window = kw.pop("_window", 0)
    window_bytes = kw.pop("_window_bytes", 0)
    deadline_s = kw.pop("_deadline_s", 0.0)
    reserved = kw.pop("_reserved", 0)
    a, k = encode_args(CLOUDPICKLE, args, kw)
    envelope = Envelope(
        method=method,
        request_id="r",
        request_codec=CLOUDPICKLE,
        response_codec=CLOUDPICKLE,
        args=a,
        kwargs=k,
        stream=stream,
        stream_window=window,
        stream_window_bytes=window_bytes,
        deadline_s=deadline_s,
    )
    return conn.send(envelope, exchange, None, reserved)


async def _until(predicate: Any, timeout_s: float = 5.0) -> None:
    """Poll a condition the replica changes (no event to wait on from here)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_the_outcome_is_the_only_answer_and_carries_the_load(
    replica: tuple[Executor, str],
) -> None:
    _, address = replica
    loads: list[tuple[int, int]] = []
    conn = _connect(address, loads=loads)
    exchange = Recorder()
    _send(conn, exchange, "echo", {"x": 1})
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events == [("result", {"x": 1})]
    assert loads == [(0, 1)]  # nothing running after it; request 1 was read
    await conn.aclose()


async def test_a_held_slot_counts_as_ongoing_is_never_rejected_and_goes_back(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica  # max_ongoing_requests=2
    conn = _connect(address)
    held = [Recorder(), Recorder()]
    numbers = [conn.reserve(exchange, None) for exchange in held]
    for exchange in held:
        await asyncio.wait_for(exchange.done.wait(), 5)
    assert [exchange.events for exchange in held] == [[("reserved", None)]] * 2
    assert executor.ongoing == 2
    # Full now: another slot, or a plain request, is refused.
    refused, plain = Recorder(), Recorder()
    conn.reserve(refused, None)
    _send(conn, plain, "echo", 1)
    for exchange in (refused, plain):
        await asyncio.wait_for(exchange.done.wait(), 5)
    assert refused.events == plain.events == [("rejected", False)]
    # The request sent in a held slot runs although the replica is full.
    used = Recorder()
    _send(conn, used, "echo", 7, _reserved=numbers[0])
    await asyncio.wait_for(used.done.wait(), 5)
    assert used.events == [("result", 7)]
    assert executor.ongoing == 1
    conn.release(numbers[1])
    await _until(lambda: executor.ongoing == 0)
    # A slot still held when the stream ends goes back too.
    last = Recorder()
    conn.reserve(last, None)
    await asyncio.wait_for(last.done.wait(), 5)
    assert executor.ongoing == 1
    await conn.aclose()
    await _until(lambda: executor.ongoing == 0)


async def test_admission_rejects_above_max_ongoing(replica: tuple[Executor, str]) -> None:
    executor, address = replica
    loads: list[tuple[int, int]] = []
    conn = _connect(address, loads=loads)
    waiting = [Recorder(), Recorder()]
    for exchange in waiting:
        _send(conn, exchange, "wait")
    await _until(lambda: executor.ongoing == 2)
    rejected = Recorder()
    _send(conn, rejected, "wait")
    await asyncio.wait_for(rejected.done.wait(), 5)
    assert rejected.events == [("rejected", False)]
    assert loads == [(2, 3)]
    executor._target.gate.set()
    for exchange in waiting:
        await asyncio.wait_for(exchange.done.wait(), 5)
        assert exchange.events[-1] == ("result", "opened")
    assert executor.ongoing == 0
    await conn.aclose()


async def test_a_draining_replica_rejects_as_retryable(replica: tuple[Executor, str]) -> None:
    executor, address = replica
    executor.draining = True
    conn = _connect(address)
    exchange = Recorder()
    _send(conn, exchange, "echo", 1)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events == [("rejected", True)]
    await conn.aclose()


async def test_cancel_frame_cancels_the_user_coroutine(replica: tuple[Executor, str]) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    frame_id = _send(conn, exchange, "wait")
    await _until(lambda: executor.ongoing == 1)
    conn.cancel(frame_id)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events[-1] == ("error", ("CancelledError", True))
    assert executor._target.cancelled == 1
    assert executor.ongoing == 0
    await conn.aclose()


async def test_past_its_budget_a_request_is_cancelled_and_answered_with_the_timeout(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    _send(conn, exchange, "wait", _deadline_s=time.monotonic() + 0.2)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events == [("error", ("RequestTimeoutError", False))]  # not "cancelled"
    assert executor._target.cancelled == 1  # the user's coroutine was cancelled
    assert executor.ongoing == 0
    await conn.aclose()


async def test_a_sync_method_past_its_budget_is_answered_while_its_thread_runs_on(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    _send(conn, exchange, "block", _deadline_s=time.monotonic() + 0.2)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events == [("error", ("RequestTimeoutError", False))]
    assert executor.ongoing == 1  # the thread cannot be interrupted: it keeps its slot
    executor._target.thread_gate.set()
    await _until(lambda: executor.ongoing == 0)
    await conn.aclose()


async def test_a_request_whose_budget_is_spent_on_arrival_does_not_run(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    _send(conn, exchange, "count", 3, _stream=True, _deadline_s=time.monotonic() - 1)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events == [("error", ("RequestTimeoutError", False))]
    assert executor._target.produced == 0
    within = Recorder()
    _send(conn, within, "echo", "in time", _deadline_s=time.monotonic() + 30)
    await asyncio.wait_for(within.done.wait(), 5)
    assert within.events == [("result", "in time")]
    assert executor.ongoing == 0
    await conn.aclose()


async def test_a_budget_that_is_not_a_usable_number_means_no_deadline(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    for deadline_s in (float("nan"), float("inf"), time.monotonic() + 1e12):
        exchange = Recorder()
        _send(conn, exchange, "echo", "fine", _deadline_s=deadline_s)
        await asyncio.wait_for(exchange.done.wait(), 5)
        assert exchange.events == [("result", "fine")], deadline_s
    assert executor.ongoing == 0
    await conn.aclose()


async def test_a_cancelled_sync_method_keeps_its_slot_until_its_thread_ends(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    frame_id = _send(conn, exchange, "block")
    await _until(lambda: executor.ongoing == 1)
    await asyncio.sleep(0.05)  # let the thread start
    conn.cancel(frame_id)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events[-1][1][1] is True  # cancelled
    assert executor.ongoing == 1  # the thread still runs user code
    executor._target.thread_gate.set()
    await _until(lambda: executor.ongoing == 0)
    await conn.aclose()


async def test_streams_pause_without_credit(replica: tuple[Executor, str]) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    frame_id = _send(conn, exchange, "count", 100, _stream=True, _window=8)
    await _until(lambda: len(exchange.items) == 8)
    await asyncio.sleep(0.2)
    assert executor._target.produced <= 9  # paused: at most one item ahead of the window
    assert len(exchange.items) == 8
    conn.credit(frame_id, 92, 1 << 20)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.items == list(range(100))
    assert exchange.events[-1] == ("end", None)
    await conn.aclose()


async def test_streams_pause_when_their_byte_window_is_used(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    size = 1 << 20  # 1 MiB items (plus a few bytes of pickle each), a window of three
    window = 3 * size + 1024
    frame_id = _send(conn, exchange, "blobs", 10, size, _stream=True, _window_bytes=window)
    await _until(lambda: len(exchange.items) == 3)
    await asyncio.sleep(0.2)
    assert len(exchange.items) == 3
    assert executor._target.produced <= 4  # at most one item waits in the replica
    conn.credit(frame_id, 3, 3 * size)
    await _until(lambda: len(exchange.items) == 6)
    conn.credit(frame_id, 100, 100 * size)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert len(exchange.items) == 10
    await conn.aclose()


async def test_unknown_method_is_a_system_error(replica: tuple[Executor, str]) -> None:
    _, address = replica
    conn = _connect(address)
    exchange = Recorder()
    _send(conn, exchange, "nope")
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events[-1] == ("error", ("ServeError", False))
    await conn.aclose()


async def test_undecodable_arguments_are_refused_not_crashed(replica: tuple[Executor, str]) -> None:
    executor, address = replica
    conn = _connect(address)
    exchange = Recorder()
    envelope = Envelope(
        method="echo",
        request_id="r",
        request_codec=CLOUDPICKLE,
        response_codec=CLOUDPICKLE,
        args=b"not a pickle",
    )
    conn.send(envelope, exchange, None)
    await asyncio.wait_for(exchange.done.wait(), 5)
    assert exchange.events[-1] == ("error", ("ServeError", False))
    assert executor.ongoing == 0
    await conn.aclose()


async def test_an_unreachable_replica_loses_requests_unwritten() -> None:
    broken: list[ConnectionLost] = []
    conn = _connect("127.0.0.1:9", broken)
    exchange = Recorder()
    _send(conn, exchange, "echo", 1)
    await asyncio.wait_for(exchange.done.wait(), 10)
    assert exchange.events == [("lost", (True, False))]  # never written: safe to retry
    assert len(broken) == 1
    await conn.aclose()


async def test_a_replica_dying_mid_request_reports_a_written_request_lost(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    broken: list[ConnectionLost] = []
    conn = _connect(address, broken)
    exchange = Recorder()
    _send(conn, exchange, "wait")
    await _until(lambda: executor.ongoing == 1)
    await replica_servers[address].stop(0)
    await asyncio.wait_for(exchange.done.wait(), 10)
    assert exchange.events == [("lost", (True, True))]  # it may have run: never retried
    assert len(broken) == 1
    await conn.aclose()


async def test_garbage_on_the_stream_ends_it_with_invalid_argument(
    replica: tuple[Executor, str],
) -> None:
    _, address = replica
    async with grpc.aio.insecure_channel(address) as channel:
        connect: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            "/serve.v1.Replica/Connect"
        )
        call = connect(
            metadata=(("serve-token", TOKEN), ("serve-replica-id", "component#Target#t1"))
        )
        await call.write(b"\x0a\x03xyz")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Malformed batch" in (info.value.details() or "")


async def test_many_requests_share_one_stream(replica: tuple[Executor, str]) -> None:
    executor, address = replica
    executor.max_ongoing = 1000
    conn = _connect(address)
    exchanges = [Recorder() for _ in range(500)]
    started = time.monotonic()
    for i, exchange in enumerate(exchanges):
        _send(conn, exchange, "echo", i)
    for exchange in exchanges:
        await asyncio.wait_for(exchange.done.wait(), 10)
    assert [e.events[-1][1] for e in exchanges] == list(range(500))
    assert time.monotonic() - started < 10
    await conn.aclose()


async def test_cancel_in_the_same_batch_as_its_request_releases_the_slot(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    conn = _connect(address)
    exchanges = []
    for _ in range(200):  # request and cancel land in one batch, before the task ever runs
        exchange = Recorder()
        conn.cancel(_send(conn, exchange, "wait"))
        exchanges.append(exchange)
    for exchange in exchanges:
        await asyncio.wait_for(exchange.done.wait(), 5)
        assert exchange.events[-1][0] in ("error", "rejected")
    assert any(e.events[-1] == ("error", ("CancelledError", True)) for e in exchanges)
    assert executor.ongoing == 0
    follow_up = Recorder()
    _send(conn, follow_up, "echo", "still serving")
    await asyncio.wait_for(follow_up.done.wait(), 5)
    assert follow_up.events[-1] == ("result", "still serving")
    await conn.aclose()


async def test_a_stream_for_another_replica_is_refused_before_any_request_is_read(
    replica: tuple[Executor, str],
) -> None:
    executor, address = replica
    broken: list[ConnectionLost] = []
    conn = _connect(address, broken, replica_id="other#Target#t9")
    exchange = Recorder()
    _send(conn, exchange, "echo", 1)
    await asyncio.wait_for(exchange.done.wait(), 10)
    assert exchange.events == [("lost", (True, False))]  # refused unread: retry elsewhere
    assert "not 'other#Target#t9'" in str(broken[0])
    assert executor.stats.requests == 0
    await conn.aclose()
