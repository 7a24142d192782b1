"""Big buffers through /dev/shm on a real Connect stream, and the fallback to gRPC.

A ReplicaConnection and a replica servicer in one process share /dev/shm, so the handshake
succeeds; the fallback is what a replica on another host does (it finds no hello file), played
by making the replica's side of the handshake find nothing.
"""

from __future__ import annotations

import asyncio
import glob
import os
from collections.abc import Iterator
from typing import Any

import pytest

from replica.executor import Executor
from serve._exchange import Envelope
from serve._rpc import shm
from serve._rpc.connection import ReplicaConnection
from serve._serialization import CLOUDPICKLE, EncodedArgs
from tests.component import test_replica_stream as base
from tests.component.test_replica_stream import Recorder, _connect, _until

# The real replica servicer of the Connect stream tests, and its cleanup.
replica = base.replica
_no_replica_context = base._no_replica_context

MIB = 1024 * 1024


def _segments() -> set[str]:
    return set(glob.glob(f"{shm.SHM_DIR}/serve-*"))


@pytest.fixture(autouse=True)
def _no_leftover_segments() -> Iterator[None]:
    before = _segments()
    yield
    assert _segments() - before == set()


def _send_big(conn: ReplicaConnection, exchange: Recorder, method: str, *args: Any) -> int:
    encoded = EncodedArgs(CLOUDPICKLE, args, {})
    envelope = Envelope(
        method=method,
        request_id="r",
        request_codec=CLOUDPICKLE,
        response_codec=CLOUDPICKLE,
        args=encoded.args,
        kwargs=encoded.kwargs,
        buffers=encoded.buffers,
        args_buffer_count=encoded.args_buffer_count,
    )
    return conn.send(envelope, exchange, None)


async def _echo(conn: ReplicaConnection, payload: bytes) -> Any:
    exchange = Recorder()
    _send_big(conn, exchange, "echo", payload)
    await asyncio.wait_for(exchange.done.wait(), 10)
    ((kind, value),) = exchange.events
    assert kind == "result"
    return value


async def test_big_buffers_go_through_shared_memory_both_ways(
    replica: tuple[Executor, str],
) -> None:
    _, address = replica
    conn = _connect(address)
    await _echo(conn, b"x")  # the first request may go before the handshake answered
    before = dict(shm.counts)
    payload = os.urandom(2 * MIB)
    assert await _echo(conn, payload) == payload
    # Both ends are this process: the argument and the result were each written and read once.
    assert shm.counts["written"] - before["written"] == 2
    assert shm.counts["read"] - before["read"] == 2
    await conn.aclose()


async def test_a_replica_that_cannot_read_the_hello_file_gets_everything_over_grpc(
    replica: tuple[Executor, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another host has no such file: the replica answers no proof, and nothing changes."""
    monkeypatch.setattr(shm, "answer_hello", lambda token: None)
    _, address = replica
    conn = _connect(address)
    await _echo(conn, b"x")
    before = dict(shm.counts)
    payload = os.urandom(2 * MIB)
    assert await _echo(conn, payload) == payload
    assert shm.counts == before
    await conn.aclose()


async def test_a_rejected_request_leaves_no_segment(replica: tuple[Executor, str]) -> None:
    executor, address = replica  # max_ongoing_requests=2
    conn = _connect(address)
    await _echo(conn, b"x")
    waiting = [Recorder(), Recorder()]
    for exchange in waiting:
        _send_big(conn, exchange, "wait")
    await _until(lambda: executor.ongoing == 2)
    rejected = Recorder()
    _send_big(conn, rejected, "echo", os.urandom(2 * MIB))
    await asyncio.wait_for(rejected.done.wait(), 5)
    assert rejected.events == [("rejected", False)]
    assert not glob.glob(f"{shm.SHM_DIR}/serve-*-d*")  # the replica removed it unread
    executor._target.gate.set()
    for exchange in waiting:
        await asyncio.wait_for(exchange.done.wait(), 5)
    await conn.aclose()


async def test_a_stream_that_ends_takes_its_unread_segments_with_it(
    replica: tuple[Executor, str],
) -> None:
    """Segments the peer never took (it stopped reading, then the stream broke) are removed
    by the end that outlives the stream."""
    _, address = replica
    conn = _connect(address)
    await _echo(conn, b"x")
    token = conn._hello.token if conn._hello else ""
    assert token
    lane = shm.SegmentLane(token, router=False, min_bytes=1)
    lane.put([b"z" * MIB])  # as if the replica had written a result and died
    assert glob.glob(f"{shm.SHM_DIR}/serve-{token}-r*")
    await conn.aclose()
    assert not glob.glob(f"{shm.SHM_DIR}/serve-{token}-*")


def test_the_handshake_needs_the_file_and_the_same_user(tmp_path: Any) -> None:
    assert shm.answer_hello("0" * 32) is None  # no such file: another host
    assert shm.answer_hello("../../etc/passwd") is None  # never a path from the wire
    hello = shm.Hello()
    assert hello.create()
    assert shm.answer_hello(hello.token) == hello.secret
    assert not os.path.exists(f"{shm.SHM_DIR}/serve-{hello.token}-hello")  # taken: removed
    assert not hello.proven("wrong")
    other = shm.Hello()
    assert other.create()
    if os.getuid() == 0:  # a file of another user proves nothing
        os.chown(f"{shm.SHM_DIR}/serve-{other.token}-hello", 65534, 65534)
        assert shm.answer_hello(other.token) is None
    other.remove()


def test_files_of_dead_routers_are_removed_once_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ends of a stream died: the next router to open a stream removes what they left."""
    import subprocess
    import time

    dead = subprocess.Popen(["true"])
    dead.wait()
    token = f"{dead.pid:08x}{'ab' * 12}"
    lane = shm.SegmentLane(token, router=True, min_bytes=1)
    lane.put([b"left behind"])
    live = shm.SegmentLane(f"{os.getpid():08x}{'cd' * 12}", router=True, min_bytes=1)
    live.put([b"still in use"])
    old = time.time() - 2 * shm.ORPHAN_AGE_S
    for path in glob.glob(f"{shm.SHM_DIR}/serve-{token}-*") + glob.glob(
        f"{shm.SHM_DIR}/serve-{live.token}-*"
    ):
        os.utime(path, (old, old))
    try:
        monkeypatch.setattr(shm, "_last_orphan_sweep", -float("inf"))  # not swept lately
        assert shm.remove_orphans() == 1
        assert not glob.glob(f"{shm.SHM_DIR}/serve-{token}-*")
        assert glob.glob(f"{shm.SHM_DIR}/serve-{live.token}-*")  # its router lives
    finally:
        shm.sweep(token)
        shm.sweep(live.token)
