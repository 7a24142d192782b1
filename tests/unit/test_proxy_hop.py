"""The proxy's hop to its ingress replica: one write per small response, the packed request,
and frames of overlapping requests sharing a gRPC message."""

from __future__ import annotations

import asyncio
from typing import Any

from serve._ingress import pack_http, unpack_asgi_args
from serve._proto.replica_pb2 import FRAME_KIND_CANCEL, FrameHeader
from serve._rpc.frames import FrameLane, iter_frames


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.append(b"".join(bytes(p) for p in parts))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def _coalescer(transport: _Transport) -> Any:
    from serve._proxy.protocol import HeadCoalescer

    return HeadCoalescer(transport, asyncio.get_running_loop())  # type: ignore[arg-type]


async def test_head_and_first_body_go_out_in_one_write() -> None:
    transport = _Transport()
    coalescer = _coalescer(transport)
    coalescer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []
    coalescer.write(b"ok")
    coalescer.write(b"more")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nok", b"more"]
    await asyncio.sleep(0)  # the end-of-turn flush finds nothing held
    assert len(transport.writes) == 2
    assert coalescer.get_extra_info("peername") == "info:peername"


async def test_a_head_without_body_goes_at_the_end_of_its_loop_turn() -> None:
    transport = _Transport()
    coalescer = _coalescer(transport)
    coalescer.write(b"head")
    await asyncio.sleep(0)
    assert transport.writes == [b"head"]
    coalescer.write(b"body")
    assert transport.writes == [b"head", b"body"]


async def test_a_big_body_is_not_copied_behind_the_head_and_close_flushes() -> None:
    transport = _Transport()
    coalescer = _coalescer(transport)
    coalescer.write(b"head")
    big = b"x" * (1 << 20)
    coalescer.write(memoryview(big))
    assert transport.writes == [b"head" + big]
    closing = _Transport()
    other = _coalescer(closing)
    other.write(b"head")
    other.close()
    assert closing.writes == [b"head"]
    assert other.is_closing()


SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "scheme": "http",
    "method": "POST",
    "path": "/app/x",
    "raw_path": b"/app/x",
    "query_string": b"a=1",
    "root_path": "",
    "headers": [(b"host", b"h"), (b"x-request-id", b"r")],
    "client": ("127.0.0.1", 5000),
    "server": ("127.0.0.1", 8000),
    "state": {},  # uvicorn's: never forwarded
    "serve.connection": object(),
}


def test_a_packed_request_unpacks_to_its_scope_and_messages() -> None:
    first = [{"type": "http.request", "body": b"abc", "more_body": False}]
    scope, messages = unpack_asgi_args(pack_http(SCOPE, first, "/app"))
    expected = {k: v for k, v in SCOPE.items() if k not in ("state", "serve.connection")}
    assert scope == {**expected, "root_path": "/app"}
    assert messages == first


def test_a_body_in_chunks_keeps_each_chunk_and_whether_more_follows() -> None:
    first = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": True},
    ]
    scope = {**SCOPE, "extensions": {"http.response.trailers": {}}}
    del scope["client"]  # a server may leave it out
    unpacked, messages = unpack_asgi_args(pack_http(scope, first, ""))
    assert messages == first
    assert unpacked["extensions"] == {"http.response.trailers": {}}
    assert unpacked["client"] is None
    last = [first[0], {"type": "http.request", "body": b"b", "more_body": False}]
    assert unpack_asgi_args(pack_http(SCOPE, last, ""))[1] == last


def test_websocket_arguments_pass_as_sent() -> None:
    args: tuple[Any, ...] = ({"type": "websocket", "path": "/"}, [])
    assert unpack_asgi_args(args) is args


def _frame(frame_id: int) -> FrameHeader:
    return FrameHeader(kind=FRAME_KIND_CANCEL, frame_id=frame_id)


async def test_under_load_the_writer_waits_one_turn_for_more_frames() -> None:
    written: list[list[int]] = []

    async def write(message: bytes) -> None:
        written.append([h.frame_id for h, _ in iter_frames(message)])

    lane = FrameLane(write)
    writer = asyncio.create_task(lane.run(), name="test:lane")
    try:
        lane.send(_frame(1))
        for _ in range(3):
            await asyncio.sleep(0)
        assert written == [[1]]  # a lone frame: written at once
        for frame_id in (2, 3, 4):
            lane.send(_frame(frame_id))
        await lane.idle.wait()
        assert written[-1] == [2, 3, 4]
        lane.send(_frame(5))  # busy now: a frame sent a turn later joins this one
        asyncio.get_running_loop().call_soon(lane.send, _frame(6))
        await lane.idle.wait()
        assert written[-1] == [5, 6]
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
