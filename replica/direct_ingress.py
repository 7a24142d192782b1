"""Direct ingress: an ingress replica serves HTTP itself (Ray's RAY_SERVE_ENABLE_DIRECT_INGRESS).

With ``SERVE_ENABLE_DIRECT_INGRESS=1`` (or ``SERVE_ENABLE_HA_PROXY=1``, which puts HAProxy in
front), a replica of an application's ingress deployment listens on a port of its own and runs
the deployment's ASGI app (or its ``__call__``) for each request in its own process: no proxy
and no hop. It gives what the proxy path gives:

- the proxy's front-door bounds: uvicorn (httptools, uvloop) with the protocol classes of
  ``serve/_proxy/protocol.py`` (head and body limits and timeouts, the connection cap where
  idle connections make room, WebSocket limits), and the body read up to
  ``SERVE_HTTP_BODY_BUFFER_BYTES`` before the request takes a slot, as the proxy reads it
  before routing (a client that dribbles its body holds a connection, not a slot);
- the route prefix (the application is mounted there, as ``root_path``), 404 elsewhere;
  ``/-/healthz`` (503 until the replica serves and once it stops, so a load balancer stops
  sending to it) and ``/-/routes``;
- request ids (``X-Request-ID``, answered) and ``serve_multiplexed_model_id``;
- ``request_timeout_s``: 408, and a deadline its nested calls inherit (they fail with
  ``RequestTimeoutError``, then the request is cancelled);
- a client that disconnects cancels the request, and every call made for it;
- backpressure: ``max_ongoing_requests`` run at once (handle calls and HTTP requests share the
  slots), up to ``max_queued_requests`` wait here for one, oldest first; the rest are answered
  with the deployment's backpressure status, as Ray's direct ingress answers;
- errors answered as the proxy answers them (``serve/_proxy/answers.py``).

The replica learns whether it is its application's ingress, and its route prefix, from the
route table the proxies watch, before it links to the controller: its HTTP address goes with
its link, and from there into the replica set that HAProxy follows.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import AsyncGenerator
from typing import Any, cast

import orjson

from replica.admission import Admission
from replica.executor import Executor
from serve import _tracing
from serve._context import (
    RequestContext,
    reset_current_request,
    set_current_deadline,
    set_current_request,
)
from serve._ingress import ASGI_METHOD
from serve._logging import access_log
from serve._models import ProxyInfo, Route
from serve._proxy.answers import (
    NO_ROUTES_MESSAGE,
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
from serve._proxy.protocol import CONNECTION_KEY, server_config
from serve._request import new_request_id
from serve._rpc.controller_client import ControllerClient
from serve._settings import settings
from serve.config import HTTPOptions
from serve.exceptions import RequestTimeoutError

logger = logging.getLogger(__name__)

ROUTES_TIMEOUT_S = 10.0  # the route table's first answer (the controller is up: it started us)
ROUTES_RETRY_S = 1.0
SHUTDOWN_GRACE_S = 5.0


class DirectIngress:
    """An ingress replica's own HTTP server; uvicorn runs this object as its ASGI app."""

    def __init__(self, executor: Executor, http: HTTPOptions, host: str) -> None:
        self._executor = executor
        self._http = http
        self._host = host
        self._app_name = executor.app_name
        self._deployment = executor.deployment
        self._timeout_s = http.request_timeout_s
        s = settings()
        self._max_request_id_length = s.max_request_id_length
        self._body_buffer_bytes = s.http_body_buffer_bytes
        self._min_draining_period_s = s.direct_ingress_min_draining_period_s
        self.route_prefix: str | None = None  # None: not its app's ingress, or gRPC only
        self.routes: list[Route] = []
        self.is_ingress = False
        self.address = ""  # host:port, once bound
        self.serving = False  # initialized, and not stopping: /-/healthz answers 200
        self._draining_since = 0.0
        self.admission = Admission(executor)  # shared with the replica's gRPC ingress
        self._sock: socket.socket | None = None
        self._server: Any = None  # the uvicorn.Server
        self._tasks: list[asyncio.Task[None]] = []

    # Lifecycle.

    async def discover(self, controller: ControllerClient) -> str:
        """Whether this replica is its application's ingress, by the controller's route table;
        if so bind its HTTP port and follow the table from now on. Returns the address ("":
        not an ingress replica, or the route table did not come)."""
        # A connection refused or cut (the controller is busy) is tried again, within the bound.
        deadline_s = time.monotonic() + ROUTES_TIMEOUT_S
        while True:
            routes = _watch(controller)
            try:
                async with asyncio.timeout(max(deadline_s - time.monotonic(), 0.0)):
                    first = await anext(routes)
                break
            except (Exception, TimeoutError) as exc:
                await routes.aclose()
                if isinstance(exc, TimeoutError) or time.monotonic() >= deadline_s:
                    logger.warning("No route table from the controller (%s): not serving HTTP", exc)
                    return ""
                logger.debug("Route table not read (%s); trying again", exc)
            await asyncio.sleep(min(ROUTES_RETRY_S, max(deadline_s - time.monotonic(), 0.0)))
        if not self._apply(first):
            await routes.aclose()
            return ""
        self._sock = _bind(self._host)
        port = self._sock.getsockname()[1]
        self.address = f"{self._host}:{port}"
        self._tasks.append(
            asyncio.create_task(self._follow_routes(controller, routes), name="replica:routes")
        )
        return self.address

    def _apply(self, routes: list[Route]) -> bool:
        """Take this replica's route from the table: whether it is its app's ingress."""
        ours = next(
            (r for r in routes if r.app_name == self._app_name and r.ingress == self._deployment),
            None,
        )
        self.route_prefix = ours.route_prefix if ours is not None else None
        self.routes = routes  # the whole table: the replica's gRPC ingress routes by it
        self.is_ingress = ours is not None  # also with no route prefix (gRPC only)
        return ours is not None

    async def _follow_routes(
        self, controller: ControllerClient, routes: AsyncGenerator[list[Route], None]
    ) -> None:
        """Keep the route prefix current (an application redeployed at another prefix)."""
        while True:
            try:
                async for table in routes:
                    self._apply(table)
            except Exception as exc:  # the controller went away: keep the last prefix
                logger.debug("Route watch failed: %s", exc)
            finally:
                await routes.aclose()
            await asyncio.sleep(ROUTES_RETRY_S)
            routes = _watch(controller)

    def start(self) -> None:
        """Serve: the deployment is initialized (as Ray, never before its constructor ran)."""
        if self._sock is None or self._server is not None:
            return
        import uvicorn

        self._server = uvicorn.Server(server_config(self, self._http))
        self.serving = True
        self._tasks.append(asyncio.create_task(self._serve(), name="replica:direct-ingress"))

    async def _serve(self) -> None:
        assert self._sock is not None
        try:
            # Not serve(): it would take SIGTERM and SIGINT from the replica, which drains.
            await self._server._serve(sockets=[self._sock])
        except Exception:
            logger.exception("The direct ingress HTTP server failed")
            raise

    async def drain(self) -> None:
        """The replica stops: /-/healthz fails from now on, and the port stays open at least
        SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, so a load balancer (HAProxy) stops sending
        before it closes; requests that still come are served."""
        if self._sock is None:
            return
        if self.serving:
            self.serving = False
            self._draining_since = time.monotonic()
        left_s = self._draining_since + self._min_draining_period_s - time.monotonic()
        if left_s > 0:
            await asyncio.sleep(left_s)

    async def aclose(self) -> None:
        """Stop listening, close idle connections, let requests in progress finish (bounded)."""
        self.serving = False
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = True  # it closes idle connections, lets the others finish
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await asyncio.gather(*self._tasks[-1:], return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # Requests.

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await lifespan(receive, send)
            return
        path = scope["path"]
        if kind == "http" and path.startswith("/-/"):
            await self._builtin(path, send)
            return
        prefix = self.route_prefix
        if not prefix:  # deleted, or gRPC only (no route prefix)
            await answer(scope, send, 404, not_found(path))
            return
        if prefix != "/":
            if not (path == prefix or (path.startswith(prefix) and path[len(prefix)] == "/")):
                await answer(scope, send, 404, not_found(path))
                return
            scope["root_path"] = scope.get("root_path", "") + prefix
        if _tracing.enabled and _tracing.TRACED_KEY not in scope:
            await _tracing.traced_http(
                self._serve_request, scope, receive, send, self._app_name, self._deployment
            )
            return
        await self._serve_request(scope, receive, send)

    async def _serve_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = ""
        model_id = ""
        body = False
        for name, value in scope["headers"]:
            if name == b"x-request-id":  # the caller's, as in Ray (a longer one: a new id)
                if len(value) <= self._max_request_id_length:
                    request_id = value.decode("latin-1")
            elif name == b"serve_multiplexed_model_id":
                model_id = value.decode("latin-1")
            elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                body = True
        if body and scope["type"] == "http":
            first = await read_body_start(receive, self._body_buffer_bytes)
            if first is None:
                return  # the client left, or its body stalled (answered 408), before admission
            receive = _Replay(first, receive)
        request = RequestContext(
            request_id=request_id or new_request_id(),
            app_name=self._app_name,
            deployment=self._deployment,
            method=ASGI_METHOD,
            multiplexed_model_id=model_id,
        )
        task = asyncio.current_task()
        assert task is not None
        cycle = _Cycle(task, request, send)
        watch = scope.get(CONNECTION_KEY)
        if watch is not None:
            watch.on_close = cycle.client_gone
        timer = None
        if self._timeout_s is not None:
            request.deadline_s = time.monotonic() + self._timeout_s
            timer = asyncio.get_running_loop().call_later(self._timeout_s, cycle.deadline_passed)
        executor = self._executor
        admitted = executor.admit()
        started = time.perf_counter()
        outcome = "OK"
        token = set_current_request(request)
        deadline_token = set_current_deadline(request.deadline_s) if request.deadline_s else None
        try:
            if not admitted:
                admitted = await self.admission.wait()
                if not admitted:
                    raise self.admission.refused()
            await executor.asgi_app()(scope, receive, cycle.send)
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            if cycle.ended is None or task.uncancel() > 0:
                raise  # not ours: the server is closing
            if cycle.ended == "deadline":
                await self._fail(scope, cycle, RequestTimeoutError(deployment=self._deployment))
        except Exception as exc:
            outcome = "ERROR"
            if not cycle.started:
                await self._fail(scope, cycle, exc)
            elif cycle.complete:  # as FastAPI's 500 page: answered, then raised
                logger.exception("The ASGI app raised after its response was sent")
            else:
                raise  # uvicorn logs it and closes the connection: the response is cut
        finally:
            cycle.done = True
            if cycle.ended is not None and task.cancelling():
                task.uncancel()  # the app returned despite the cancellation we asked for
            if timer is not None:
                timer.cancel()
            if watch is not None:
                watch.on_close = None
            if deadline_token is not None:
                deadline_token.var.reset(deadline_token)
            reset_current_request(token)
            if admitted:
                executor.release()
                self._record(request, outcome, started)

    async def _fail(self, scope: Scope, cycle: _Cycle, exc: BaseException) -> None:
        if cycle.started:
            return  # too late to answer: the client sees the connection end
        found = error_answer(exc, self._app_name, self._timeout_s)
        if found is not None:
            cycle.started = True
            await answer(scope, cycle.raw_send, *found)

    def _record(self, request: RequestContext, outcome: str, started: float) -> None:
        executor = self._executor
        duration_ms = (time.perf_counter() - started) * 1000.0
        executor.stats.record(duration_ms, error=outcome == "ERROR")
        log = access_log()
        if log is not None and executor.access_log:
            log.record(request.request_id, ASGI_METHOD, outcome, duration_ms)

    async def _builtin(self, path: str, send: Send) -> None:
        if path == "/-/healthz":
            if self.serving and self.is_ingress:
                await send_body(send, 200, b"success", b"text/plain")
            elif not self.is_ingress:
                await send_body(send, 503, NO_ROUTES_MESSAGE.encode(), b"text/plain")
            else:
                await send_body(send, 503, b"This replica is not serving.", b"text/plain")
        elif path == "/-/routes":
            table = {self.route_prefix: self._app_name} if self.route_prefix else {}
            await send_body(send, 200, orjson.dumps(table), b"application/json")
        else:
            await send_body(send, 404, f"Path '{path}' not found.".encode(), b"text/plain")


class _Cycle:
    """One request in progress: its task, and whether (and why) it was ended early."""

    __slots__ = ("complete", "done", "ended", "raw_send", "request", "started", "task")

    def __init__(self, task: asyncio.Task[Any], request: RequestContext, send: Send) -> None:
        self.task = task
        self.request = request
        self.raw_send = send
        self.started = False  # the response started: errors can no longer be answered
        self.complete = False  # the whole response went out
        self.done = False
        self.ended: str | None = None  # "gone" (the client left) or "deadline"

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            headers = list(message.get("headers", ()))
            headers.append((b"x-request-id", self.request.request_id.encode()))
            message["headers"] = headers
        elif kind == "http.response.body":
            self.complete = not message.get("more_body", False)
        elif kind in ("websocket.accept", "websocket.close"):
            self.started = True
        await self.raw_send(message)

    def client_gone(self) -> None:
        """The connection closed: the request and its nested calls are cancelled."""
        if self.done or self.complete or self.ended is not None:
            return
        self.ended = "gone"
        for child in list(self.request.children):
            child.cancel()
        self.task.cancel()

    def deadline_passed(self) -> None:
        """request_timeout_s passed: nested calls fail with RequestTimeoutError, then (a loop
        turn later, so code awaiting them sees that error) the request is cancelled."""
        if self.done or self.ended is not None:
            return
        self.ended = "deadline"
        for child in list(self.request.children):
            child.expire()
        asyncio.get_running_loop().call_soon(self._cancel)

    def _cancel(self) -> None:
        if not self.done:
            self.task.cancel()
        else:
            self.ended = None


class _Replay:
    """The app's ``receive``: the body messages read before admission, then the connection's."""

    __slots__ = ("_first", "_receive")

    def __init__(self, first: list[Message], receive: Receive) -> None:
        self._first = collections.deque(first)
        self._receive = receive

    async def __call__(self) -> Message:
        if self._first:
            return self._first.popleft()
        return await self._receive()


def _watch(controller: ControllerClient) -> AsyncGenerator[list[Route], None]:
    """The route table stream (a replica is not a proxy: no node id, nothing to show)."""
    routes = controller.watch_routes(ProxyInfo(node_id="", pid=0, http_address=""))
    return cast(AsyncGenerator[list[Route], None], routes)


def _bind(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    return sock
