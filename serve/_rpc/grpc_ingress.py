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

import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import grpc.aio

from serve._context import RequestContext, request_deadline, set_current_request
from serve._ingress import GRPC_METHOD
from serve._models import Route
from serve._rpc.channel import CHANNEL_OPTIONS
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
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

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if method == HEALTH_CHECK:
            return grpc.unary_unary_rpc_method_handler(self._health)
        # A partial of an async generator function still reads as one to grpc.aio.
        return grpc.unary_stream_rpc_method_handler(functools.partial(self._forward, method))

    async def _health(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return SERVING if self._readiness.ready else NOT_SERVING

    async def _forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        route = self._route(metadata.get("application", ""))
        if route is None:
            known = sorted(r.app_name for r in self._routes.routes)
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Application {metadata.get('application', '')!r} not found; set the "
                f"'application' metadata to one of {known}.",
            )
        assert route is not None
        handle = self._routes.handle(route).options(
            method_name=GRPC_METHOD,
            stream=True,
            multiplexed_model_id=metadata.get("multiplexed_model_id", ""),
            request_serialization="pickle",
            response_serialization="pickle",
        )
        if metadata.get("request_id"):
            set_current_request(RequestContext(request_id=metadata["request_id"]))
        remaining = context.time_remaining()
        limits = [t for t in (remaining, self._timeout_s) if t is not None]
        timeout_s = min(limits) if limits else None
        try:
            with request_deadline(timeout_s):  # enforced by the router and the replicas
                stream = handle.remote(method, request, self._functions)
            async for payload in stream:
                yield payload
        except RequestTimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"Request timed out after {timeout_s}s."
            )
        except BackPressureError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except DeploymentUnavailableError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except RequestCancelledError as exc:
            await context.abort(grpc.StatusCode.CANCELLED, str(exc))
        except Exception as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _route(self, app_name: str) -> Route | None:
        if app_name:
            return self._routes.by_app(app_name)
        routes = self._routes.routes
        return routes[0] if len(routes) == 1 else None


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
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
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
