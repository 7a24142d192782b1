"""The proxy's ASGI app: match a route, forward the connection to the ingress deployment.

Each HTTP request or WebSocket is one streaming call of the ingress deployment (see
``serve/_ingress.py``), routed like any handle call: power of two choices, backpressure,
retries only of requests no replica admitted. Errors become HTTP answers, as in Ray:
backpressure 503, ``request_timeout_s`` passed 408, no route 404, anything else 500 with a
body that says what failed. A client that disconnects cancels the request in the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from serve._context import RequestContext, request_deadline, set_current_request
from serve._ingress import body_messages
from serve._proxy.routes import RouteTable
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
)

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The scope keys a replica needs (uvicorn adds its own objects, which do not pickle).
SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "scheme",
    "method",
    "path",
    "raw_path",
    "query_string",
    "root_path",
    "headers",
    "client",
    "server",
    "subprotocols",
    "extensions",
)
STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.close"})
PUMP_AFTER_S = 0.05  # a request answered within this needs no task watching for a disconnect
DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})


class ProxyApp:
    """What uvicorn runs in each proxy worker."""

    def __init__(self, routes: RouteTable, *, request_timeout_s: float | None) -> None:
        self._routes = routes
        self._timeout_s = request_timeout_s
        self.ready = False  # the first route table arrived

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        path = scope["path"]
        if kind == "http" and path.startswith("/-/"):
            await self._builtin(path, send)
            return
        route = self._routes.match(path)
        if route is None:
            await _answer(
                scope,
                send,
                404,
                f"Path '{path}' not found. Ping http://.../-/routes for available routes.",
            )
            return
        handle = self._routes.forwarder(route)
        forwarded = {k: scope[k] for k in SCOPE_KEYS if k in scope}
        if route.route_prefix != "/":
            forwarded["root_path"] = scope.get("root_path", "") + route.route_prefix
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":  # the caller's request id, as in Ray
                set_current_request(RequestContext(request_id=value.decode("latin-1")))
            elif name == b"serve_multiplexed_model_id":  # Ray's header for multiplexing
                handle = handle.options(multiplexed_model_id=value.decode("latin-1"))
        first: list[Message] = []
        if kind == "http":
            first.append(await receive())  # the body (or its first chunk) travels with the call
        state = _Forward()
        try:
            # The deadline travels with the request (and every nested call made to serve it):
            # the router fails it with RequestTimeoutError when it passes, the replicas cancel
            # the work.
            if self._timeout_s is None:
                await self._forward(handle, forwarded, first, receive, send, state)
            else:
                with request_deadline(self._timeout_s):
                    await self._forward(handle, forwarded, first, receive, send, state)
        except RequestTimeoutError:  # not a TimeoutError of the user's own: that is a 500
            await _fail(
                scope,
                send,
                state,
                408,
                f"Request timed out after {self._timeout_s}s (request_timeout_s).",
            )
        except BackPressureError as exc:
            await _fail(scope, send, state, 503, str(exc))
        except DeploymentUnavailableError as exc:
            await _fail(scope, send, state, 503, str(exc))
        except RequestCancelledError:
            pass  # the client went away
        except Exception as exc:
            logger.warning("Request to %s failed: %s", route.app_name, exc)
            await _fail(scope, send, state, 500, f"{type(exc).__name__}: {exc}")

    async def _forward(
        self,
        handle: Any,
        scope: Scope,
        first: list[Message],
        receive: Receive,
        send: Send,
        state: _Forward,
    ) -> None:
        stream = handle.remote(scope, first)
        pump: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle | None = None

        def start_pump() -> None:
            nonlocal pump
            pump = asyncio.create_task(_pump(receive, stream, state), name="proxy:receive")

        if first and first[0]["type"] in DISCONNECTS:
            pass  # the client is already gone
        elif first and not first[0].get("more_body"):
            # The whole body came with the call: until the response is slow, nothing more can
            # arrive but a disconnect, so most requests finish before any pump task exists.
            timer = asyncio.get_running_loop().call_later(PUMP_AFTER_S, start_pump)
        else:
            start_pump()  # more body to come, or a WebSocket
        try:
            request_id = stream.request_id.encode()
            async for batch in stream:
                for message in batch:
                    kind = message["type"]
                    if kind in STARTS:
                        state.started = True
                        if kind == "http.response.start":  # the request's id, as Ray answers
                            headers = list(message.get("headers", ()))
                            headers.append((b"x-request-id", request_id))
                            message["headers"] = headers
                    await send(message)
                    if kind == "http.response.body" and not message.get("more_body"):
                        state.complete = True
                if state.complete:
                    stream._detach()  # the call's end (and any background task) runs alone
                    break
            state.finished = True
            if not state.started:
                raise RuntimeError("The deployment ended the request without a response.")
        finally:
            if timer is not None:
                timer.cancel()
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            if not state.finished:
                stream.cancel()

    async def _builtin(self, path: str, send: Send) -> None:
        if path == "/-/healthz":
            if self.ready:
                await _send_body(send, 200, b"success", b"text/plain")
            else:
                await _send_body(send, 503, b"The proxy has no route table yet.", b"text/plain")
        elif path == "/-/routes":
            table = {r.route_prefix: r.app_name for r in self._routes.routes}
            await _send_body(send, 200, orjson.dumps(table), b"application/json")
        else:
            await _send_body(send, 404, f"Path '{path}' not found.".encode(), b"text/plain")


class _Forward:
    """What one forwarded connection has done so far."""

    __slots__ = ("complete", "finished", "started")

    def __init__(self) -> None:
        self.started = False  # the response started: errors can no longer be answered
        self.complete = False  # the whole response went out
        self.finished = False


async def _pump(receive: Receive, stream: Any, state: _Forward) -> None:
    """Feed what the client sends to the replica; a disconnect cancels the request."""
    while True:
        message = await receive()
        stream._feed(pickle.dumps(message, protocol=5))
        if message["type"] in DISCONNECTS:
            if message["type"] == "http.disconnect" or not state.started:
                stream.cancel()
            return


async def _fail(scope: Scope, send: Send, state: _Forward, status: int, text: str) -> None:
    if state.started:
        return  # too late to answer: the client sees the connection end
    state.started = True
    await _answer(scope, send, status, text)


async def _answer(scope: Scope, send: Send, status: int, text: str) -> None:
    if scope["type"] == "websocket":
        # Before accept, closing answers the handshake with 403; 1011 after it.
        await send({"type": "websocket.close", "code": 1011, "reason": text[:120]})
        return
    await _send_body(send, status, text.encode(), b"text/plain; charset=utf-8")


async def _send_body(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    for message in body_messages(status, body, content_type):
        await send(message)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
