"""The inputs of one forwarded HTTP or WebSocket connection, as its ASGI app reads them.

The proxy feeds a running ingress request its client's further receive messages (body chunks,
WebSocket messages, the disconnect). Each message read is credited back at once
(``FRAME_KIND_INPUT_CREDIT``), so the proxy sends only as fast as the app reads: what waits here
is bounded by the ingress window.

A client that leaves ends the app's work: the disconnect goes to an app waiting in
``receive()``, as under uvicorn, and an app that is not (busy elsewhere, or ignoring its
client) is cancelled at once, or ``DISCONNECT_GRACE_S`` after it was told, so a departed
client never holds the replica's slot.
"""

from __future__ import annotations

import asyncio
import collections
import pickle
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]

DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})
DISCONNECT_GRACE_S = 1.0  # an app told of its client's departure has this long to finish


class InputFeed:
    """Fed inputs in order; ``on_read(count, nbytes)`` credits what the app took, and
    ``on_gone()`` ends the request whose client left."""

    __slots__ = ("_gone_timer", "_inputs", "_on_gone", "_on_read", "_waiter")

    def __init__(self, on_read: Callable[[int, int], None], on_gone: Callable[[], None]) -> None:
        self._inputs: collections.deque[tuple[Message, int]] = collections.deque()
        self._on_read = on_read
        self._on_gone = on_gone
        self._waiter: asyncio.Future[None] | None = None
        self._gone_timer: asyncio.TimerHandle | None = None

    def put(self, payload: bytes | memoryview) -> None:
        message: Message = pickle.loads(payload)
        self._inputs.append((message, len(payload)))
        if message.get("type") not in DISCONNECTS:
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # it hears the disconnect; it gets a moment to finish
            loop = asyncio.get_running_loop()
            self._gone_timer = loop.call_later(DISCONNECT_GRACE_S, self._on_gone)
        else:
            self._on_gone()  # busy elsewhere: it would only learn at its next receive()

    async def get(self) -> Message:
        while not self._inputs:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message, nbytes = self._inputs.popleft()
        self._on_read(1, nbytes)
        return message

    def close(self) -> None:
        """The request ended."""
        if self._gone_timer is not None:
            self._gone_timer.cancel()
            self._gone_timer = None
        self._inputs.clear()
