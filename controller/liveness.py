"""Liveness of the controller's long-lived streams (Link, WatchRoutes, WatchDeployment).

A stream that carries nothing says nothing about its peer: a cut cable drops packets and
neither end notices until TCP gives up, minutes later. So each end says something at least every
``SERVE_HEARTBEAT_PERIOD_S`` (an update, or a heartbeat when it has nothing to say) and gives the
stream up after ``SERVE_HEARTBEAT_TIMEOUT_S`` without a word from the other. The peer's words
are sent from its event loop: a process that is stopped, or whose loop is stuck, goes silent
too, though its sockets still answer TCP and HTTP/2 pings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def _next(source: AsyncIterator[T]) -> T:
    return await anext(source)


async def _drain(requests: AsyncIterator[object], heard: list[float]) -> None:
    async for _ in requests:
        heard[0] = time.monotonic()


async def with_heartbeats(
    requests: AsyncIterator[object],
    updates: AsyncIterator[T],
    heartbeat: T,
    *,
    period_s: float,
    timeout_s: float,
    on_silent: Callable[[], None],
    name: str,
) -> AsyncIterator[T]:
    """Yield each update as it comes, and ``heartbeat`` after ``period_s`` without one.

    Ends when ``updates`` ends, when the peer closes its side of the stream, or when nothing
    came from it (``requests``: heartbeats or anything else) for ``timeout_s``; in that last
    case ``on_silent()`` is called first. ``name`` names the tasks it owns.
    """
    heard = [time.monotonic()]
    loop = asyncio.get_running_loop()
    reader = loop.create_task(_drain(requests, heard), name=f"{name}:read")
    pending = loop.create_task(_next(updates), name=f"{name}:next")
    try:
        while True:
            await asyncio.wait(
                {reader, pending}, timeout=period_s, return_when=asyncio.FIRST_COMPLETED
            )
            if reader.done():  # the peer closed (or broke) its side
                return
            if time.monotonic() - heard[0] > timeout_s:
                on_silent()
                return
            if not pending.done():
                yield heartbeat
                continue
            try:
                update = pending.result()
            except StopAsyncIteration:
                return
            yield update
            pending = loop.create_task(_next(updates), name=f"{name}:next")
    finally:
        for task in (reader, pending):
            task.cancel()
        await asyncio.gather(reader, pending, return_exceptions=True)
        close = getattr(updates, "aclose", None)
        if close is not None:
            await close()
