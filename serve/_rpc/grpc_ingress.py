"""The proxy's gRPC ingress: user-defined gRPC services served by ingress deployments, as Ray's
gRPC proxy serves them, without the user's protos in the proxy.

Every method path is accepted and forwarded as raw bytes: the ingress replica deserializes the
request with the servicer functions' own (de)serializers, calls the deployment's method named
after the RPC method, and sends back serialized responses (one for a unary method, one per
item for a server-streaming one). The application is chosen by the ``application`` metadata
key (or is the only one); ``multiplexed_model_id`` and ``request_id`` metadata are honoured.
The standard ``grpc.health.v1.Health`` service answers SERVING once routes are known.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from serve import _tracing
from serve._context import RequestContext, request_deadline, set_current_request
from serve._ingress import GRPC_METHOD, GrpcStatusError
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
DEADLINE_SLACK_S = 0.01  # a call cancelled this close to its deadline was cancelled by it
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
NOT_SERVING = b"\x08\x02"


class Routes(Protocol):
    @property
    def routes(self) -> list[Route]: ...
    def by_app(self, app_name: str) -> Route | None: ...
    def handle(self, route: Route) -> Any: ...


class Readiness(Protocol):
    ready: bool


class _Ingress(grpc.GenericRpcHandler):
    def __init__(
        self,
        routes: Routes,
        servicer_functions: Sequence[str],
        request_timeout_s: float | None,
        readiness: Readiness,
    ) -> None:
        self._routes = routes
        self._functions = tuple(servicer_functions)
        self._timeout_s = request_timeout_s
        self._readiness = readiness
        self._max_request_id_length = settings().max_request_id_length

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if method == HEALTH_CHECK:
            return grpc.unary_unary_rpc_method_handler(self._health)
        # A partial of an async generator function still reads as one to grpc.aio.
        if _tracing.enabled:
            traced = functools.partial(_tracing.traced_grpc, self._forward, method)
            return grpc.unary_stream_rpc_method_handler(traced)
        return grpc.unary_stream_rpc_method_handler(functools.partial(self._forward, method))

    async def _health(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return SERVING if self._readiness.ready else NOT_SERVING

    async def _forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        relay = self._relay(method, request, context)
        del request  # the relay holds it while it runs
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
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[bytes | _Failed, None]:
        """The forwarded call's responses, or, last, how it failed."""
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        route = self._route(metadata.get("application", ""))
        if route is None:
            known = sorted(r.app_name for r in self._routes.routes)
            yield _Failed(
                grpc.StatusCode.NOT_FOUND,
                f"Application {metadata.get('application', '')!r} not found; set the "
                f"'application' metadata to one of {known}.",
            )
            return
        handle = self._routes.handle(route).options(
            method_name=GRPC_METHOD,
            stream=True,
            multiplexed_model_id=metadata.get("multiplexed_model_id", ""),
            request_serialization="pickle",
            response_serialization="pickle",
        )
        request_id = metadata.get("request_id", "")
        if request_id and len(request_id) <= self._max_request_id_length:
            set_current_request(RequestContext(request_id=request_id))
        remaining = context.time_remaining()
        limits = [t for t in (remaining, self._timeout_s) if t is not None]
        timeout_s = min(limits) if limits else None
        with request_deadline(timeout_s):  # enforced by the router and the replicas
            stream = handle.remote(method, request, self._functions)
        try:
            async for payload in stream:
                yield payload
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= DEADLINE_SLACK_S:
                # gRPC ended the call at its deadline. The replica has the same deadline and
                # ends the work itself, failing nested calls with RequestTimeoutError first;
                # a cancel sent now would race it.
                stream._detach()
            raise
        except Exception as exc:
            # Also the ended request's outcome: its traceback (this frame holds the request)
            # would keep the request alive in a cycle until the cyclic collector runs.
            exc.__traceback__ = None
            yield _Failed(*_status_of(exc, timeout_s))

    def _route(self, app_name: str) -> Route | None:
        if app_name:
            return self._routes.by_app(app_name)
        routes = self._routes.routes
        return routes[0] if len(routes) == 1 else None


class _Failed:
    """How a forwarded call failed: the status it ends with."""

    __slots__ = ("code", "details")

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


def _status_of(exc: Exception, timeout_s: float | None) -> tuple[grpc.StatusCode, str]:
    """The gRPC status a failed forwarded call ends with."""
    if isinstance(exc, RequestTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"Request timed out after {timeout_s}s."
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, DeploymentUnavailableError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, RequestCancelledError):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, GrpcStatusError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN), exc.details
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


async def start_grpc_ingress(
    routes: Routes,
    *,
    host: str,
    port: int,
    servicer_functions: Sequence[str],
    request_timeout_s: float | None,
    ready: Readiness,
) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC ingress server; returns it and the port it took."""
    # The bounds of the daemons' own servers: message size (SERVE_MAX_MESSAGE_BYTES), handshake
    # and idle timeouts, and the connection cap.
    server = grpc.aio.server(options=server_options(raise_open_file_limit()))
    server.add_generic_rpc_handlers(
        (_Ingress(routes, servicer_functions, request_timeout_s, ready),)
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(
            f"serve-proxy: cannot listen for gRPC on {host}:{port}. Free the port or choose "
            "another with grpc_options={'port': ...} (serve start --grpc-port)."
        )
    await server.start()
    return server, bound
