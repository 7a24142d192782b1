"""The proxy's gRPC ingress: user-defined gRPC services served by ingress deployments, as Ray's
gRPC proxy serves them, without the user's protos in the proxy.

Every method path is accepted as a bidirectional stream of raw messages, which is what every
gRPC method is on the wire: a unary client sends one message and half-closes, a
client-streaming one sends several. The first message travels with the call; when the method
reads a request stream the replica asks for the rest (INPUT_WANTED) and they follow as inputs,
within the ingress window. The ingress replica decodes with the servicer functions' own
(de)serializers and calls the deployment's method named after the RPC method (see
``replica/grpc_methods.py``). The application is chosen by the ``application`` metadata key
(or is the only one); ``multiplexed_model_id`` and ``request_id`` metadata are honoured, and
the request id comes back in the trailing metadata. What the method set on its
``grpc_context`` (code, details, trailing metadata, compression) is applied to the call.
Ray's ``RayServeAPIService`` (``ListApplications``, ``Healthz``) and the standard
``grpc.health.v1.Health`` service are answered here.

The same server runs in a direct-ingress replica (``replica/direct_grpc.py``): there the call
is dispatched to the replica's own deployment in process instead of through a handle; the
choice of application, the statuses and the request id are decided here for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import pickle
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol, cast

import grpc
import grpc.aio

from serve import _tracing
from serve._context import RequestContext, request_deadline, set_current_request
from serve._ingress import (
    GRPC_END_INPUT,
    GRPC_METHOD,
    INPUT_WANTED,
    GrpcCall,
    GrpcCallEnd,
    GrpcStatusError,
)
from serve._models import Route
from serve._rpc.channel import raise_open_file_limit, server_options
from serve._settings import settings
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
LIST_APPLICATIONS = "/ray.serve.RayServeAPIService/ListApplications"
HEALTHZ = "/ray.serve.RayServeAPIService/Healthz"
NO_ROUTES_MESSAGE = "Route table is not populated yet."
MAX_DETAILS_LENGTH = 4096  # status details travel in HTTP/2 trailers, which are bounded
DEADLINE_SLACK_S = 0.01  # a call cancelled this close to its deadline was cancelled by it
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
NOT_SERVING = b"\x08\x02"


class Routes(Protocol):
    @property
    def routes(self) -> list[Route]: ...
    def by_app(self, app_name: str) -> Route | None: ...


class ProxyRoutes(Routes, Protocol):
    def handle(self, route: Route) -> Any: ...


class Readiness(Protocol):
    @property
    def ready(self) -> bool: ...


GrpcIngressServer = grpc.aio.Server  # for owners that do not import grpc themselves


class Forwarded(Protocol):
    """One dispatched call: its stream items (see ``serve/_ingress.py``), and its inputs."""

    @property
    def request_id(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[Any]: ...
    async def send_input(self, message: bytes) -> None:
        """One more request message of the client (waits while the ingress window is full)."""

    def end_input(self) -> None:
        """The client half-closed: no more request messages."""

    def detach(self) -> None:
        """The call ended at its deadline here: its work ends at the same deadline by itself
        (failing nested calls with RequestTimeoutError first), so it is not cancelled."""

    def close(self) -> None:
        """The gRPC call is over, however it ended: work still running (and not detached)
        is cancelled."""


class Dispatch(Protocol):
    """Start a call of ``method`` on the route's ingress deployment. ``request_id`` is the
    client's ("" for a new one); ``timeout_s`` bounds the call and its nested calls."""

    def __call__(
        self,
        route: Route,
        method: str,
        first: list[bytes],
        call: GrpcCall,
        *,
        model_id: str,
        request_id: str,
        timeout_s: float | None,
    ) -> Forwarded: ...


class _HandleCall:
    """A call forwarded through a handle to a replica (the serve-proxy's way)."""

    __slots__ = ("__weakref__", "_stream")

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    @property
    def request_id(self) -> str:
        return str(self._stream.request_id)

    def __aiter__(self) -> AsyncIterator[Any]:
        return cast(AsyncIterator[Any], self._stream.__aiter__())

    async def send_input(self, message: bytes) -> None:
        stream = self._stream
        if stream._input_full():
            await stream._input_room()
        stream._feed(pickle.dumps({"type": "grpc.message", "body": message}, protocol=5))

    def end_input(self) -> None:
        self._stream._feed(pickle.dumps(GRPC_END_INPUT, protocol=5))

    def detach(self) -> None:
        self._stream._detach()

    def close(self) -> None:
        pass  # a stream dropped before its end cancels its request (DeploymentResponseGenerator)


def via_handles(routes: ProxyRoutes, servicer_functions: Sequence[str]) -> Dispatch:
    """Dispatch through the routes' handles: the call runs in some ingress replica."""
    functions = tuple(servicer_functions)

    def dispatch(
        route: Route,
        method: str,
        first: list[bytes],
        call: GrpcCall,
        *,
        model_id: str,
        request_id: str,
        timeout_s: float | None,
    ) -> Forwarded:
        handle = routes.handle(route).options(
            method_name=GRPC_METHOD,
            stream=True,
            multiplexed_model_id=model_id,
            request_serialization="pickle",
            response_serialization="pickle",
        )
        if request_id:
            set_current_request(RequestContext(request_id=request_id))
        with request_deadline(timeout_s):  # enforced by the router and the replicas
            return _HandleCall(handle.remote(method, first, functions, call))

    return dispatch


class _Ingress(grpc.GenericRpcHandler):
    def __init__(
        self,
        routes: Routes,
        dispatch: Dispatch,
        request_timeout_s: float | None,
        readiness: Readiness,
    ) -> None:
        self._routes = routes
        self._dispatch = dispatch
        self._timeout_s = request_timeout_s
        self._readiness = readiness
        self._max_request_id_length = settings().max_request_id_length

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if method == HEALTH_CHECK:
            return grpc.unary_unary_rpc_method_handler(self._health)
        if method == LIST_APPLICATIONS:
            return grpc.unary_unary_rpc_method_handler(self._list_applications)
        if method == HEALTHZ:
            return grpc.unary_unary_rpc_method_handler(self._healthz)
        # A partial of an async generator function still reads as one to grpc.aio.
        if _tracing.enabled:
            traced = functools.partial(_tracing.traced_grpc, self._forward, method)
            return grpc.stream_stream_rpc_method_handler(traced)
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._forward, method))

    async def _health(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return SERVING if self._readiness.ready else NOT_SERVING

    async def _list_applications(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Ray's ListApplicationsResponse{application_names}, encoded by hand (field 1)."""
        if not self._readiness.ready:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(NO_ROUTES_MESSAGE)
        names = sorted({r.app_name for r in self._routes.routes})
        return b"".join(_length_delimited(1, name.encode()) for name in names)

    async def _healthz(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        """Ray's HealthzResponse{message}: "success", or UNAVAILABLE with the reason."""
        message = "success" if self._readiness.ready else NO_ROUTES_MESSAGE
        if not self._readiness.ready:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(message)
        return _length_delimited(1, message.encode())

    async def _forward(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        relay = self._relay(method, requests, context)
        del requests  # the relay holds it while it runs
        status: tuple[grpc.StatusCode, str] | None = None
        async for item in relay:
            if isinstance(item, _Failed):
                status = item.code, item.details
                break
            yield item
        if status is not None:
            await relay.aclose()
            del relay, item
            # Out of any except block, with nothing of the request left in this frame: grpc
            # keeps the AbortError in a reference cycle with the call's state, which must not
            # reach the request (and its payload) until the cyclic collector runs.
            await context.abort(*status)

    async def _relay(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[bytes | _Failed, None]:
        """The forwarded call's responses, or, last, how it failed."""
        invocation = tuple(
            (k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)
        )
        metadata = dict(invocation)
        app_name = metadata.get("application", "")
        route = self._route(app_name)
        if route is None:
            which = (
                f"Application '{app_name}' not found."
                if app_name
                else ("Application metadata not set.")
            )
            yield _Failed(
                grpc.StatusCode.NOT_FOUND,
                f"{which} Ping {LIST_APPLICATIONS} for available applications.",
            )
            return
        request_id = metadata.get("request_id", "")
        if len(request_id) > self._max_request_id_length:
            request_id = ""  # a new one, as for HTTP
        remaining = context.time_remaining()
        limits = [t for t in (remaining, self._timeout_s) if t is not None]
        timeout_s = min(limits) if limits else None
        try:
            first = [await anext(requests)]  # a unary call's one message, with the call
        except StopAsyncIteration:
            first = []
        call = GrpcCall(invocation_metadata=invocation, peer=context.peer())
        try:
            stream = self._dispatch(
                route,
                method,
                first,
                call,
                model_id=metadata.get("multiplexed_model_id", ""),
                request_id=request_id,
                timeout_s=timeout_s,
            )
        except GrpcStatusError as exc:
            yield _Failed(*_status_of(exc, timeout_s))
            return
        del first
        # However the call ends, even while this generator waits outside its own code. Weakly:
        # a handle's stream dropped with this generator cancels its request by itself. (The
        # stubs type the callback as a class of their own: any callable is taken.)
        context.add_done_callback(functools.partial(_close, weakref.ref(stream)))  # type: ignore[arg-type]
        pump: asyncio.Task[None] | None = None
        end: GrpcCallEnd | None = None
        try:
            async for item in stream:
                if type(item) is bytes:
                    yield item
                elif item == INPUT_WANTED:
                    pump = asyncio.create_task(_pump(requests, stream), name="proxy:grpc-input")
                elif isinstance(item, GrpcCallEnd):
                    end = item
            _finish(context, end, stream.request_id)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= DEADLINE_SLACK_S:
                # gRPC ended the call at its deadline. The replica has the same deadline and
                # ends the work itself, failing nested calls with RequestTimeoutError first;
                # a cancel sent now would race it.
                stream.detach()
            raise
        except Exception as exc:
            # Also the ended request's outcome: its traceback (this frame holds the request)
            # would keep the request alive in a cycle until the cyclic collector runs.
            exc.__traceback__ = None
            yield _Failed(*_status_of(exc, timeout_s))
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    def _route(self, app_name: str) -> Route | None:
        if app_name:
            return self._routes.by_app(app_name)
        routes = self._routes.routes
        return routes[0] if len(routes) == 1 else None


def _close(stream: weakref.ref[Forwarded], _: object) -> None:
    found = stream()
    if found is not None:
        found.close()


class _Failed:
    """How a forwarded call failed: the status it ends with."""

    __slots__ = ("code", "details")

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


async def _pump(requests: AsyncIterator[bytes], stream: Forwarded) -> None:
    """Feed the client's further request messages to the call, within the ingress window
    (the client is not read meanwhile: HTTP/2 flow control holds it back), then the end."""
    async for message in requests:
        await stream.send_input(message)
    stream.end_input()


def _finish(context: grpc.aio.ServicerContext[Any, Any], end: GrpcCallEnd | None, rid: str) -> None:
    """Apply what the method set on its grpc_context; the request id goes back, as Ray's."""
    if end is None:
        context.set_trailing_metadata((("request_id", rid),))
        return
    if end.code:
        context.set_code(getattr(grpc.StatusCode, end.code, grpc.StatusCode.UNKNOWN))
    if end.details:
        context.set_details(end.details)
    if end.compression is not None:
        context.set_compression(end.compression)
    context.set_trailing_metadata(end.trailing_metadata or (("request_id", rid),))


def _length_delimited(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a string or bytes)."""
    size = len(payload)
    varint = bytearray()
    while True:
        byte = size & 0x7F
        size >>= 7
        varint.append(byte | 0x80 if size else byte)
        if not size:
            break
    return bytes([field << 3 | 2]) + bytes(varint) + payload


def _status_of(exc: Exception, timeout_s: float | None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed forwarded call ends with, as Ray's proxy answers."""
    if isinstance(exc, RequestTimeoutError):
        text = f"Request timed out after {timeout_s}s." if timeout_s else "Request timed out."
        return grpc.StatusCode.DEADLINE_EXCEEDED, text
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, RequestCancelledError):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, GrpcStatusError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
        return code, _truncated(exc.details or str(exc.__cause__ or ""))
    return grpc.StatusCode.INTERNAL, _truncated(f"{type(exc).__name__}: {exc}")


def _truncated(text: str) -> str:
    if len(text) <= MAX_DETAILS_LENGTH:
        return text
    notice = "... [truncated]"
    return text[: MAX_DETAILS_LENGTH - len(notice)] + notice


async def start_grpc_ingress(
    routes: Routes,
    dispatch: Dispatch,
    *,
    host: str,
    port: int,
    request_timeout_s: float | None,
    ready: Readiness,
    who: str = "serve-proxy",
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC ingress server; returns it and the port it took."""
    # The bounds of the daemons' own servers: message size (SERVE_MAX_MESSAGE_BYTES), handshake
    # and idle timeouts, and the connection cap.
    server = grpc.aio.server(options=server_options(raise_open_file_limit()))
    server.add_generic_rpc_handlers((_Ingress(routes, dispatch, request_timeout_s, ready),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(
            f"{who}: cannot listen for gRPC on {host}:{port}. Free the port or choose "
            "another with grpc_options={'port': ...} (serve start --grpc-port)."
        )
    await server.start()
    return server, bound
