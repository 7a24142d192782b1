"""Direct gRPC ingress: an ingress replica serves its application's gRPC services itself.

With direct ingress on (``SERVE_ENABLE_DIRECT_INGRESS=1`` or ``SERVE_ENABLE_HA_PROXY=1``) and
``grpc_options.grpc_servicer_functions`` given, an ingress replica listens for gRPC on a port
of its own besides its HTTP one (``replica/direct_ingress.py``), announces it to the controller
with its link, and runs each call in process: no proxy, no hop. The server is the serve-proxy's
gRPC ingress (``serve/_rpc/grpc_ingress.py``), so the application is chosen by the same rule
(the ``application`` metadata, or the only application), with the same statuses, the request
id in the trailing metadata, the client's deadline (and ``grpc_options.request_timeout_s``)
carried into nested calls, and the daemons' server bounds (message size, connection cap). Only
the dispatch differs: a call for this replica's own application runs here, one for another
application is answered NOT_FOUND (a replica knows its own route, as for HTTP).

Each call runs in a task of its own, as a request does in a replica behind the proxy: the
client's departure cancels it and its nested calls; at its deadline its nested calls fail with
``RequestTimeoutError``, then it is cancelled. Calls take the replica's slots as HTTP requests
and handle calls do (``replica/admission.py``): past ``max_queued_requests`` waiting, a call is
answered RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from replica.direct_ingress import DirectIngress
from replica.executor import Executor
from replica.grpc_methods import serve_grpc_call
from serve._context import RequestContext
from serve._ingress import GRPC_END_INPUT, GRPC_METHOD, GrpcCall, GrpcStatusError
from serve._logging import access_log
from serve._models import Route
from serve._request import new_request_id
from serve._rpc.grpc_ingress import GrpcIngressServer, start_grpc_ingress
from serve._settings import settings
from serve.config import gRPCOptions
from serve.exceptions import RequestTimeoutError

STOP_GRACE_S = 5.0  # calls in progress when the replica stops finish within this
# A client's gRPC library cancels the call at its deadline, which reaches this replica (through
# HAProxy, say) before the deadline this replica counts from the call's arrival: a cancel this
# close to the deadline is the deadline's, and the work ends by it (at most this much later).
NEAR_DEADLINE_S = 0.25


class DirectGrpc:
    """An ingress replica's own gRPC server. It follows the route table its HTTP side
    (``DirectIngress``) keeps, and shares its admission of requests."""

    def __init__(
        self, executor: Executor, http: DirectIngress, grpc: gRPCOptions, host: str
    ) -> None:
        self._executor = executor
        self._http = http
        self._functions = grpc.grpc_servicer_functions
        self._timeout_s = grpc.request_timeout_s
        self._host = host
        self._window_bytes = settings().ingress_window_bytes
        self._server: GrpcIngressServer | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self) -> str:
        """Listen on an ephemeral port; returns host:port. Calls that come before the
        deployment is initialized are answered UNAVAILABLE (nobody is told of the port
        before: the controller publishes running replicas only)."""
        self._server, port = await start_grpc_ingress(
            self,
            self._dispatch,
            host=self._host,
            port=0,
            request_timeout_s=self._timeout_s,
            ready=self,
            who="serve-replica",
        )
        self.address = f"{self._host}:{port}"
        return self.address

    async def aclose(self) -> None:
        """Stop listening; calls in progress get STOP_GRACE_S to finish, then are cancelled."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(STOP_GRACE_S)
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    # What the gRPC ingress asks of its routes and readiness.

    @property
    def routes(self) -> list[Route]:
        return self._http.routes

    def by_app(self, app_name: str) -> Route | None:
        return next((r for r in self._http.routes if r.app_name == app_name), None)

    @property
    def ready(self) -> bool:
        """Health/Check SERVING and Healthz "success" while the replica serves (not once it
        stops: a load balancer stops sending)."""
        return self._http.serving and self._http.is_ingress

    def _dispatch(
        self,
        route: Route,
        method: str,
        first: list[bytes],
        call: GrpcCall,
        *,
        model_id: str,
        request_id: str,
        timeout_s: float | None,
    ) -> LocalCall:
        executor = self._executor
        if route.app_name != executor.app_name or route.ingress != executor.deployment:
            raise GrpcStatusError(
                "NOT_FOUND",
                f"Application '{route.app_name}' is not served by this replica (an ingress "
                f"replica of '{executor.app_name}'). Call it through the gRPC port of the "
                "serve proxy (or HAProxy), which routes every application.",
            )
        if not executor.initialized:
            raise GrpcStatusError(
                "UNAVAILABLE",
                f"This replica of '{executor.app_name}' is still initializing; retry.",
            )
        request = RequestContext(
            request_id=request_id or new_request_id(),
            app_name=executor.app_name,
            deployment=executor.deployment,
            method=GRPC_METHOD,
            multiplexed_model_id=model_id,
        )
        local = LocalCall(request, self._window_bytes)
        work = local.run(
            self._http.admission.enter,
            self._serve(method, first, call, request),
            self._finished,
            str(executor.replica_id.deployment_id),
            timeout_s,
        )
        task = asyncio.create_task(work, name=f"replica:grpc:{request.request_id}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        local.task = task
        return local

    async def _serve(
        self, method: str, first: list[bytes], call: GrpcCall, request: RequestContext
    ) -> AsyncGenerator[Any, None]:
        async for item in serve_grpc_call(
            self._executor,
            self._executor.deployment,
            method,
            first,
            self._functions,
            call,
            request,
        ):
            yield item

    def _finished(self, request: RequestContext, outcome: str, started: float) -> None:
        """An admitted call ended: its slot is freed, its outcome counted and logged."""
        executor = self._executor
        executor.release()
        duration_ms = (time.perf_counter() - started) * 1000.0
        executor.stats.record(duration_ms, error=outcome == "ERROR")
        log = access_log()
        if log is not None and executor.access_log:
            log.record(request.request_id, GRPC_METHOD, outcome, duration_ms)


class _Raised:
    """The call's work failed: the ingress answers this error's status."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


_END = object()


class _Pipe:
    """Items from one task to another, holding at most about ``limit_bytes`` (always one)."""

    __slots__ = ("_bytes", "_items", "_limit_bytes", "_readable", "_room")

    def __init__(self, limit_bytes: int) -> None:
        self._items: collections.deque[tuple[Any, int]] = collections.deque()
        self._bytes = 0
        self._limit_bytes = limit_bytes
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    async def put(self, item: Any, nbytes: int) -> None:
        while self._items and self._bytes + nbytes > self._limit_bytes:
            self._room.clear()
            await self._room.wait()
        self.put_last(item, nbytes)

    def put_last(self, item: Any, nbytes: int = 0) -> None:
        """Put without waiting (the last item: it must not be lost)."""
        self._items.append((item, nbytes))
        self._bytes += nbytes
        self._readable.set()

    async def get(self) -> Any:
        while not self._items:
            self._readable.clear()
            await self._readable.wait()
        item, nbytes = self._items.popleft()
        self._bytes -= nbytes
        self._room.set()
        return item


class LocalCall:
    """One gRPC call run in this replica: the gRPC ingress reads its items and feeds it the
    client's further messages (both within the ingress window)."""

    __slots__ = (
        "__weakref__",
        "_detached",
        "_expired",
        "_inputs",
        "_outputs",
        "request",
        "request_id",
        "task",
    )

    def __init__(self, request: RequestContext, window_bytes: int) -> None:
        self.request = request
        self.request_id = request.request_id
        self.task: asyncio.Task[None] | None = None
        self._outputs = _Pipe(window_bytes)
        self._inputs = _Pipe(window_bytes)
        self._detached = False
        self._expired = False
        request.feed = self  # the method's gRPCInputStream reads the inputs from here

    # The gRPC ingress's side.

    def __aiter__(self) -> LocalCall:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._outputs.get()
        except asyncio.CancelledError:
            if not self._detached:
                self._cancel()  # the client left
            raise
        if item is _END:
            raise StopAsyncIteration
        if type(item) is _Raised:
            raise item.error
        return item

    async def send_input(self, message: bytes) -> None:
        await self._inputs.put({"type": "grpc.message", "body": message}, len(message))

    def end_input(self) -> None:
        self._inputs.put_last(GRPC_END_INPUT)

    def detach(self) -> None:
        self._detached = True

    def close(self) -> None:
        if not self._detached:
            self._cancel()

    # The method's side.

    async def get(self) -> dict[str, Any]:
        message: dict[str, Any] = await self._inputs.get()
        return message

    # The work.

    async def run(
        self,
        admit: Callable[[], Awaitable[None]],
        work: AsyncGenerator[Any, None],
        finished: Callable[[RequestContext, str, float], None],
        deployment: str,
        timeout_s: float | None,
    ) -> None:
        """Take a slot (``admit``), pass on the items of ``work``, and say how it ``finished``
        once admitted; every end is an item for the reader."""
        request = self.request
        outputs = self._outputs
        timer = None
        if timeout_s is not None:
            request.deadline_s = time.monotonic() + max(timeout_s, 0.0)
            loop = asyncio.get_running_loop()
            timer = loop.call_later(max(timeout_s, 0.0), self._deadline_passed)
        admitted = False
        started = time.perf_counter()
        outcome = "OK"
        try:
            await admit()
            admitted = True
            started = time.perf_counter()
            async for item in work:
                await outputs.put(item, len(item) if type(item) is bytes else 0)
            outputs.put_last(_END)
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            if not self._expired:
                raise  # the client left, or the replica stops: nobody to answer
            timed_out = RequestTimeoutError(
                deployment=deployment,
                method=GRPC_METHOD,
                timeout_s=timeout_s or 0.0,
            )
            outputs.put_last(_Raised(timed_out))
        except Exception as exc:
            outcome = "ERROR"
            exc.__traceback__ = None  # the frames hold the request's messages
            outputs.put_last(_Raised(exc))
        finally:
            if timer is not None:
                timer.cancel()
            try:
                await work.aclose()  # the method's own cleanup runs now, not when collected
            finally:
                if admitted:
                    finished(request, outcome, started)

    def _deadline_passed(self) -> None:
        """Nested calls fail with RequestTimeoutError, then (a loop turn later, so code
        awaiting them sees that error) the call is cancelled."""
        self._expired = True
        for child in list(self.request.children):
            child.expire()
        task = self.task
        if task is not None:
            asyncio.get_running_loop().call_soon(task.cancel)

    def _cancel(self) -> None:
        """The client left (or the call ended): its work and nested calls are cancelled,
        unless the call ended at its deadline: then the work ends by it (nested calls fail
        with RequestTimeoutError first), whichever of the two grpc and this replica saw first."""
        task = self.task
        if task is None or task.done():
            return
        deadline_s = self.request.deadline_s
        if deadline_s and time.monotonic() >= deadline_s - NEAR_DEADLINE_S:
            return
        for child in list(self.request.children):
            child.cancel()
        task.cancel()
