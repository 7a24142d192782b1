"""HTTP answers a front door gives without the app: errors as Ray answers them, built-in
routes, lifespan. Shared by the proxy (``serve/_proxy/http.py``) and by ingress replicas that
serve HTTP themselves (``replica/direct_ingress.py``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from serve._ingress import body_messages
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
)

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Scope = dict[str, Any]
Headers = tuple[tuple[bytes, bytes], ...]
Answer = tuple[int, str, Headers]  # status, body text, extra headers
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NO_ROUTES_MESSAGE = "Route table is not populated yet."


def error_answer(exc: BaseException, app_name: str, timeout_s: float | None) -> Answer | None:
    """The HTTP answer to a failed request, as Ray answers (None: the client left)."""
    if isinstance(exc, RequestTimeoutError):  # not a TimeoutError of the user's: a 500
        return 408, f"Request timed out after {timeout_s}s (request_timeout_s).", ()
    if isinstance(exc, BackPressureError):  # the deployment's backpressure_config
        return exc.status_code, str(exc), retry_after(exc.retry_after_s)
    if isinstance(exc, DeploymentUnavailableError):
        return 503, str(exc), ()
    if isinstance(exc, RequestCancelledError):
        return None  # the client went away
    logger.warning("Request to %s failed: %s", app_name, exc)
    return 500, f"{type(exc).__name__}: {exc}", ()


def retry_after(retry_after_s: float | None) -> Headers:
    """A ``Retry-After`` header for a backpressure answer (whole seconds, rounded up)."""
    if retry_after_s is None:
        return ()
    return ((b"retry-after", b"%d" % max(0, math.ceil(retry_after_s))),)


def not_found(path: str) -> str:
    return f"Path '{path}' not found. Ping http://.../-/routes for available routes."


async def answer(scope: Scope, send: Send, status: int, text: str, headers: Headers = ()) -> None:
    """Answer with a plain-text body; a WebSocket is closed instead."""
    if scope["type"] == "websocket":
        # Before accept, closing answers the handshake with 403; 1011 after it.
        await send({"type": "websocket.close", "code": 1011, "reason": text[:120]})
        return
    await send_body(send, status, text.encode(), b"text/plain; charset=utf-8", headers)


async def send_body(
    send: Send, status: int, body: bytes, content_type: bytes, headers: Headers = ()
) -> None:
    for message in body_messages(status, body, content_type, headers):
        await send(message)


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer a server's lifespan events (the front door itself needs none)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body_start(receive: Receive, limit_bytes: int) -> list[Message] | None:
    """A request's body, up to ``limit_bytes`` (SERVE_HTTP_BODY_BUFFER_BYTES), read before it
    takes a replica's slot (the proxy: before routing; direct ingress: before admission), so a
    client that sends it slowly holds a connection, never a slot; one whose body stalls is cut
    by the connection's body timeout (408). None: the client left first."""
    first: list[Message] = []
    buffered = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        first.append(message)
        buffered += len(message.get("body", b""))
        if not message.get("more_body") or buffered >= limit_bytes:
            return first
