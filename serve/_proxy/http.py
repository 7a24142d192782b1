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
from typing import Any

import orjson

from serve import _tracing
from serve._context import RequestContext, request_deadline, set_current_request
from serve._ingress import HTTP_SCOPE_FIELDS, pack_http
from serve._proxy.answers import (
    NO_ROUTES_MESSAGE,
    Headers,
    Message,
    Receive,
    Scope,
    Send,
    answer,
    error_answer,
    lifespan,
    not_found,
    read_body_start,
    send_body,
)
from serve._proxy.protocol import CONNECTION_KEY, ConnectionWatch
from serve._proxy.routes import RouteTable
from serve._settings import settings

logger = logging.getLogger(__name__)

# The scope keys a replica needs (uvicorn adds its own objects, which do not pickle).
SCOPE_KEYS = ("type", *HTTP_SCOPE_FIELDS, "subprotocols", "extensions")
STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.close"})
PUMP_AFTER_S = 0.05  # a request answered within this needs no task watching for a disconnect
DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})


class ProxyApp:
    """What uvicorn runs in each proxy worker."""

    def __init__(self, routes: RouteTable, *, request_timeout_s: float | None) -> None:
        self._routes = routes
        self._timeout_s = request_timeout_s
        self.ready = False  # a route table with some route in it arrived (then stays True)
        s = settings()
        self._body_buffer_bytes = s.http_body_buffer_bytes
        self._max_request_id_length = s.max_request_id_length

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan(receive, send)
            return
        path = scope["path"]
        if kind == "http" and path.startswith("/-/"):
            await self._builtin(path, send)
            return
        route = self._routes.match(path)
        if route is None:
            await answer(
                scope,
                send,
                404,
                not_found(path),
            )
            return
        if _tracing.enabled and _tracing.TRACED_KEY not in scope:  # again, in its span
            await _tracing.traced_http(self, scope, receive, send, route.app_name, route.ingress)
            return
        handle = self._routes.forwarder(route)
        root_path = scope.get("root_path", "")
        if route.route_prefix != "/":
            root_path += route.route_prefix
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":  # the caller's request id, as in Ray
                # A longer one is not the caller's to impose on every log line: a new id.
                if len(value) <= self._max_request_id_length:
                    set_current_request(RequestContext(request_id=value.decode("latin-1")))
            elif name == b"serve_multiplexed_model_id":  # Ray's header for multiplexing
                handle = handle.options(multiplexed_model_id=value.decode("latin-1"))
        first: list[Message] = []
        if kind == "http":
            # The body read before routing travels with the call; the rest follows as inputs,
            # as fast as the app reads.
            read = await read_body_start(receive, self._body_buffer_bytes)
            if read is None:
                return  # the client left before its request could be routed
            first = read
            args = pack_http(scope, first, root_path)
        else:
            forwarded = {k: scope[k] for k in SCOPE_KEYS if k in scope}
            forwarded["root_path"] = root_path
            args = (forwarded, first)
        state = _Forward(kind == "websocket")
        watch = scope.get(CONNECTION_KEY)
        try:
            # The deadline travels with the request (and every nested call made to serve it):
            # the router fails it with RequestTimeoutError when it passes, the replicas cancel
            # the work.
            if self._timeout_s is None:
                await self._forward(handle, args, first, receive, send, state, watch)
            else:
                with request_deadline(self._timeout_s):
                    await self._forward(handle, args, first, receive, send, state, watch)
        except Exception as exc:
            # The error is also the ended request's outcome: its traceback (our frames, which
            # hold the request) would make a cycle that keeps the request and its body alive
            # until the cyclic collector happens to run.
            exc.__traceback__ = None
            found = error_answer(exc, route.app_name, self._timeout_s)
            if found is not None:
                await _fail(scope, send, state, *found)

    async def _forward(
        self,
        handle: Any,
        args: tuple[Any, ...],
        first: list[Message],
        receive: Receive,
        send: Send,
        state: _Forward,
        watch: ConnectionWatch | None,
    ) -> None:
        stream = handle.remote(*args)
        pump: asyncio.Task[None] | None = None
        timer: asyncio.TimerHandle | None = None

        def start_pump() -> None:
            nonlocal pump
            pump = asyncio.create_task(_pump(receive, stream, state, watch), name="proxy:receive")

        if not first or first[-1].get("more_body"):
            start_pump()  # more body to come, or a WebSocket
        elif watch is not None:
            # The whole body came with the call: nothing more can arrive but a disconnect,
            # which the connection announces itself. No task, no timer.
            watch.on_close = stream.cancel
        else:
            # Under another server (no ConnectionWatch): until the response is slow, most
            # requests finish before any pump task exists.
            timer = asyncio.get_running_loop().call_later(PUMP_AFTER_S, start_pump)
        try:
            request_id = stream.request_id.encode()
            async for batch in stream:
                for message in batch:
                    kind = message["type"]
                    if kind in STARTS:
                        state.started = True
                        if kind == "http.response.start":  # the request's id, as Ray answers
                            headers = message.get("headers")
                            if type(headers) is list:  # decoded here: ours to change
                                headers.append((b"x-request-id", request_id))
                            else:
                                message["headers"] = [
                                    *(headers or ()),
                                    (b"x-request-id", request_id),
                                ]
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
            if watch is not None:
                watch.on_close = None
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
                await send_body(send, 200, b"success", b"text/plain")
            else:  # as Ray answers until an application is exposed
                await send_body(send, 503, NO_ROUTES_MESSAGE.encode(), b"text/plain")
        elif path == "/-/routes":
            table = {r.route_prefix: r.app_name for r in self._routes.routes if r.route_prefix}
            await send_body(send, 200, orjson.dumps(table), b"application/json")
        else:
            await send_body(send, 404, f"Path '{path}' not found.".encode(), b"text/plain")


class _Forward:
    """What one forwarded connection has done so far."""

    __slots__ = ("complete", "finished", "started", "websocket")

    def __init__(self, websocket: bool) -> None:
        self.websocket = websocket
        self.started = False  # the response started: errors can no longer be answered
        self.complete = False  # the whole response went out
        self.finished = False


async def _pump(
    receive: Receive, stream: Any, state: _Forward, watch: ConnectionWatch | None
) -> None:
    """Feed what the client sends to the replica, never more than the ingress window ahead of
    what the app has read (the client is not read meanwhile: TCP holds it back). A disconnect
    cancels an HTTP request; a WebSocket app hears it (see ``replica/feed.py``)."""
    while True:
        if stream._input_full() and not await _room_or_gone(stream, watch):
            # The client left while the replica was behind: do not wait to read it.
            if state.websocket and state.started:
                gone = {"type": "websocket.disconnect", "code": 1006}
                stream._feed(pickle.dumps(gone, protocol=5))
            else:
                stream.cancel()
            return
        message = await receive()
        stream._feed(pickle.dumps(message, protocol=5))
        if message["type"] in DISCONNECTS:
            if message["type"] == "http.disconnect" or not state.started:
                stream.cancel()
            return


async def _room_or_gone(stream: Any, watch: ConnectionWatch | None) -> bool:
    """Until the window has room (True) or the client's connection closed (False)."""
    if watch is None:
        await stream._input_room()
        return True
    room = asyncio.ensure_future(stream._input_room())
    gone = asyncio.ensure_future(watch.wait_closed())
    try:
        await asyncio.wait((room, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        room.cancel()
        gone.cancel()
    return not watch.closed


async def _fail(
    scope: Scope, send: Send, state: _Forward, status: int, text: str, headers: Headers = ()
) -> None:
    if state.started:
        return  # too late to answer: the client sees the connection end
    state.started = True
    await answer(scope, send, status, text, headers)
