"""`make bench`'s stream floor: what one multiplexed grpc.aio stream carries, bare.

The data plane's method without the framework: one long-lived bidirectional stream on one
channel, requests matched to replies by frame id, a writer task draining a queue into one message
of length-prefixed frames (``u32 length | u64 frame_id | payload``) whenever it is free, a reader
task splitting the echoed messages and resolving each caller's future. The server (the floor
server's ``Mux``) echoes every message whole. Run in the bench process against the floor server
in its own process: the layout of a driver and its replica. Every serve figure that carries a
request (L1, T1) gets its ratio to this, as well as to the unary floor.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc.aio

_FRAME = struct.Struct("<IQ")  # frame length (frame id + payload), frame id


class MuxClient:
    """Requests over one stream; whatever is queued when the writer is free goes as one."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call: Any = channel.stream_stream("/floor.Floor/Mux")()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._queue: list[bytes] = []
        self._wakeup = asyncio.Event()
        self._next_frame_id = 0
        self._tasks = [
            asyncio.create_task(self._write(), name="floor:mux:write"),
            asyncio.create_task(self._read(), name="floor:mux:read"),
        ]

    async def call(self, payload: bytes) -> bytes:
        self._next_frame_id += 1
        frame_id = self._next_frame_id
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = future
        self._queue.append(_FRAME.pack(8 + len(payload), frame_id) + payload)
        self._wakeup.set()
        return await future

    async def _write(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            frames, self._queue = self._queue, []
            await self._call.write(b"".join(frames))

    async def _read(self) -> None:
        pending = self._pending
        while True:
            message = await self._call.read()
            if message is grpc.aio.EOF:
                return
            view = memoryview(message)
            offset = 0
            while offset < len(view):
                length, frame_id = _FRAME.unpack_from(view, offset)
                end = offset + 4 + length
                future = pending.pop(frame_id)
                if not future.done():
                    future.set_result(bytes(view[offset + 12 : end]))
                offset = end

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._call.cancel()


async def measure_stream_floor(
    channel: grpc.aio.Channel,
    s: Any,
    *,
    latency: Callable[..., Awaitable[dict[str, float]]],
    rate: Callable[..., Awaitable[float]],
) -> dict[str, Any]:
    """L1 (sequential) and T1 (closed loop, 64 and 256 callers) over one multiplexed stream."""
    mux = MuxClient(channel)
    try:
        out: dict[str, Any] = {"L1": await latency(lambda: mux.call(b"x"), s.latency_n, s.warmup_n)}
        for concurrency in (64, 256):
            out[f"T1_c{concurrency}_rps"] = await rate(
                lambda: mux.call(b"x"), concurrency, s.seconds
            )
        return out
    finally:
        await mux.aclose()
