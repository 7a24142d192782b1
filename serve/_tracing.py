"""OpenTelemetry tracing through the graph, with Ray Serve's span names and behaviour.

Spans (Ray's names and attributes):

- ``proxy_http_request`` / ``proxy_grpc_request`` (SERVER) in serve-proxy: the root of a trace,
  or a child of the client's W3C ``traceparent`` (HTTP header or gRPC metadata).
- ``route_to_replica`` (CLIENT) wherever a handle call is made with tracing on (the proxy, or a
  replica serving a request): from the call until its outcome, so queueing, retries and the
  replica's work all fall inside it.
- ``replica_handle_request <deployment> <method>`` (SERVER) in the replica, around the user's
  method; nested handle calls made while serving it are its children.

A span's context crosses processes in the frame header (``FrameHeader.trace_context``, W3C
``traceparent``/``tracestate``). Sampling is decided once, at the root, by
``ParentBased(TraceIdRatioBased(sampling_ratio))``; everything downstream follows the
parent's decision, which travels in the ``traceparent`` flags.

Only proxies and replicas trace (as in Ray): each calls :func:`setup` at start from its
``SERVE_TRACING_*`` settings, which the controller's environment hands down. Until then the
request path reads one module global, ``enabled``, and never imports OpenTelemetry.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from serve._import_path import import_attr
from serve._ingress import ASGI_METHOD, GRPC_METHOD
from serve._settings import settings
from serve.schema import DEFAULT_TRACING_EXPORTER_IMPORT_PATH, TracingConfig

logger = logging.getLogger(__name__)

# Ray's path for its default exporter: configs written for Ray mean ours.
RAY_DEFAULT_EXPORTER_IMPORT_PATH = "ray.serve._private.tracing_utils:default_tracing_exporter"
SPANS_DIR = "spans"
INSTALL_HINT = "pip install 'rayless-serve[tracing]' (opentelemetry-api and opentelemetry-sdk)"
TRACED_KEY = "serve.traced"  # in an ASGI scope the proxy already opened a span for

enabled = False  # set by setup(); the request path checks it before anything else
_tracer: Any = None
_otel: Any = None  # the OpenTelemetry functions the request path uses (see _Otel)
# The proxy span of the request being routed (to label with the request id once known), and
# the method the client called.
_ingress: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "serve_ingress_span", default=None
)


class _Otel:
    """OpenTelemetry's API, imported once by :func:`setup`."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.attach = context.attach
        self.detach = context.detach
        self.get_current = context.get_current
        self.set_span_in_context = trace.set_span_in_context
        self.propagator = TraceContextTextMapPropagator()
        self.server = trace.SpanKind.SERVER
        self.client = trace.SpanKind.CLIENT
        self.ok = trace.Status(trace.StatusCode.OK)
        self.Status = trace.Status
        self.error_code = trace.StatusCode.ERROR


# Setup, in each proxy and replica.


def is_default_exporter(path: str) -> bool:
    return path in (DEFAULT_TRACING_EXPORTER_IMPORT_PATH, RAY_DEFAULT_EXPORTER_IMPORT_PATH)


def default_tracing_exporter(tracing_file_name: str) -> list[Any]:
    """Ray's default exporter: each span as one JSON line (the SDK's ``to_json`` fields),
    appended to ``tracing_file_name`` (under the logs directory's ``spans/``, private to its
    user). Spans are written in batches by the SDK's worker thread, not on the request path."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    path = Path(tracing_file_name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return [
        BatchSpanProcessor(
            _json_lines_exporter()(path), max_queue_size=16384, schedule_delay_millis=500
        )
    ]


def _json_lines_exporter() -> Any:
    """The default exporter's class (made on first use: OpenTelemetry is imported then)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.util import ns_to_iso_str

    def context(span_context: Any) -> dict[str, str]:
        return {
            "trace_id": f"0x{span_context.trace_id:032x}",
            "span_id": f"0x{span_context.span_id:016x}",
            "trace_state": repr(span_context.trace_state),
        }

    class JsonLinesExporter(SpanExporter):
        def __init__(self, path: Path) -> None:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._resource: bytes | None = None

        def _line(self, span: Any) -> bytes:
            status = {"status_code": span.status.status_code.name}
            if span.status.description:
                status["description"] = span.status.description
            if self._resource is None:
                resource = span.resource
                self._resource = orjson.dumps(
                    {"attributes": dict(resource.attributes), "schema_url": resource.schema_url}
                )
            body = orjson.dumps(
                {
                    "name": span.name,
                    "context": context(span.context),
                    "kind": str(span.kind),
                    "parent_id": f"0x{span.parent.span_id:016x}" if span.parent else None,
                    "start_time": ns_to_iso_str(span.start_time),
                    "end_time": ns_to_iso_str(span.end_time) if span.end_time else None,
                    "status": status,
                    "attributes": dict(span.attributes or {}),
                    "events": [
                        {
                            "name": e.name,
                            "timestamp": ns_to_iso_str(e.timestamp),
                            "attributes": dict(e.attributes or {}),
                        }
                        for e in span.events
                    ],
                    "links": [
                        {
                            "context": context(link.context),
                            "attributes": dict(link.attributes or {}),
                        }
                        for link in span.links
                    ],
                }
            )
            return body[:-1] + b',"resource":' + self._resource + b"}\n"

        def export(self, spans: Any) -> Any:
            try:
                os.write(self._fd, b"".join(self._line(span) for span in spans))
            except (OSError, TypeError, ValueError):
                logger.exception("Could not write %d span(s)", len(spans))
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    return JsonLinesExporter


def check_exporter(path: str) -> Callable[..., Any]:
    """The exporter function ``path`` names, checked: ImportError (OpenTelemetry missing, or
    the path cannot be imported) or TypeError (not a function of no arguments)."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"Tracing needs the OpenTelemetry SDK: {INSTALL_HINT}.") from exc
    if is_default_exporter(path):
        return default_tracing_exporter
    function = import_attr(path, "The tracing exporter (exporter_import_path)")
    if not inspect.isfunction(function):
        raise TypeError(
            f"The tracing exporter {path!r} must be a function returning a list of "
            f"SpanProcessors, got {type(function).__name__}."
        )
    if inspect.signature(function).parameters:
        raise TypeError(f"The tracing exporter {path!r} must take no arguments.")
    return function


def _span_processors(path: str, tracing_file_name: str) -> list[Any]:
    from opentelemetry.sdk.trace import SpanProcessor

    function = check_exporter(path)
    if function is default_tracing_exporter:
        return default_tracing_exporter(tracing_file_name)
    processors = function()
    if not isinstance(processors, list) or not all(
        isinstance(p, SpanProcessor) for p in processors
    ):
        raise TypeError(
            f"The tracing exporter {path!r} must return a list of SpanProcessors, got "
            f"{processors!r}."
        )
    return processors


def tracing_env(config: TracingConfig) -> dict[str, str]:
    """The controller's ``SERVE_TRACING_*`` environment for ``config`` (proxies and replicas
    inherit it), its exporter checked here first."""
    if not config.enabled:
        return {"SERVE_TRACING_EXPORTER_IMPORT_PATH": ""}
    check_exporter(config.exporter_import_path)
    return {
        "SERVE_TRACING_EXPORTER_IMPORT_PATH": config.exporter_import_path,
        "SERVE_TRACING_SAMPLING_RATIO": repr(config.sampling_ratio),
    }


def describe() -> dict[str, Any]:
    """This process's tracing settings, as the dashboard shows them."""
    s = settings()
    path = s.tracing_exporter_import_path
    return {
        "enabled": bool(path),
        "exporter": path,
        "sampling_ratio": s.tracing_sampling_ratio,
        "file_exporter": bool(path) and is_default_exporter(path),
    }


def spans_dir(log_dir: Path) -> Path:
    """Where the default exporter of processes logging to ``log_dir`` writes."""
    return log_dir / SPANS_DIR


def setup(component: str, log_file: Path | None) -> bool:
    """Turn tracing on in this process if the settings say so; False if they do not, or if it
    cannot be (logged: the process serves on untraced, as Ray's components do).

    The default exporter writes ``<log_file's directory>/spans/<component>_tracing.json``.
    """
    global enabled, _tracer, _otel
    s = settings()
    path = s.tracing_exporter_import_path
    if not path:
        return False
    where = log_file.parent if log_file is not None else s.state_dir / "logs"
    file_name = str(spans_dir(where) / f"{component}_tracing.json")
    try:
        processors = _span_processors(path, file_name)
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(s.tracing_sampling_ratio)),
            resource=Resource.create({"service.name": "serve", "serve.component": component}),
        )
        for processor in processors:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        _otel = _Otel()
        _tracer = provider.get_tracer("serve")
    except Exception as exc:
        logger.error("Tracing is off in %s: %s", component, exc)
        return False
    enabled = True
    logger.info("Tracing on (exporter %s, sampling ratio %g)", path, s.tracing_sampling_ratio)
    return True


def get_trace_context() -> Any:
    """The OpenTelemetry context of the request being served, to parent spans of your own
    (Ray's ``serve.get_trace_context``); None when tracing is off in this process.

    Example::

        tracer = opentelemetry.trace.get_tracer(__name__)
        with tracer.start_as_current_span("tokenize", context=serve.get_trace_context()):
            ...
    """
    if not enabled:
        return None
    return _otel.get_current()


# The spans. Each function is called only when ``enabled``.


def _start(name: str, kind: Any, parent: Any, attributes: Mapping[str, Any]) -> Any:
    return _tracer.start_span(
        name,
        context=parent,
        kind=kind,
        attributes={k: v for k, v in attributes.items() if v is not None},
    )


def _remote_parent(carrier: Mapping[str, str]) -> Any:
    """The context a W3C ``traceparent`` (and ``tracestate``) names, or None."""
    if "traceparent" not in carrier:
        return None
    return _otel.propagator.extract(carrier)


async def traced_http(
    app: Callable[[Any, Any, Any], Awaitable[None]],
    scope: dict[str, Any],
    receive: Any,
    send: Callable[[dict[str, Any]], Awaitable[None]],
    app_name: str,
    deployment: str,
) -> None:
    """Run the proxy's ``app`` for one routed HTTP request inside a ``proxy_http_request``
    span (the scope is marked so ``app`` does not open another)."""
    carrier = {}
    for name, value in scope.get("headers", ()):
        if name in (b"traceparent", b"tracestate"):
            carrier[name.decode()] = value.decode("latin-1")
        elif name == b"x-request-id":
            carrier["x-request-id"] = value.decode("latin-1")
    method = scope.get("method", "WS")
    path = scope.get("path", "")
    span = _start(
        "proxy_http_request",
        _otel.server,
        _remote_parent(carrier),
        {
            "request_id": carrier.get("x-request-id"),
            "deployment": deployment,
            "app": app_name,
            "request_type": scope["type"],
            "request_method": method,
            "request_route_path": path,
            "http.method": method,
            "http.route": path,
        },
    )
    status = 0

    async def watched(message: dict[str, Any]) -> None:
        nonlocal status
        kind = message["type"]
        if kind == "http.response.start":
            status = message["status"]
        elif kind == "websocket.accept":
            status = 101
        await send(message)

    scope[TRACED_KEY] = True
    token = _otel.attach(_otel.set_span_in_context(span))
    ingress = _ingress.set((span, "__call__"))
    try:
        await app(scope, receive, watched)
    finally:
        _ingress.reset(ingress)
        _otel.detach(token)
        if status:
            span.set_attribute("http.status_code", status)
        if status >= 500 or not status:
            span.set_status(_otel.Status(_otel.error_code, f"HTTP {status or 'no response'}"))
        else:
            span.set_status(_otel.ok)
        span.end()


async def traced_grpc(
    forward: Callable[[str, Any, Any], AsyncIterator[bytes]],
    method: str,
    requests: Any,
    context: Any,
) -> AsyncIterator[bytes]:
    """The proxy's forwarded gRPC call inside a ``proxy_grpc_request`` span."""
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    service, _, rpc_method = method.lstrip("/").rpartition("/")
    span = _start(
        "proxy_grpc_request",
        _otel.server,
        _remote_parent(metadata),
        {
            "request_id": metadata.get("request_id"),
            "app": metadata.get("application"),
            "request_type": "grpc",
            "request_method": method,
            "request_route_path": metadata.get("application"),
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": rpc_method,
        },
    )
    calls = forward(method, requests, context)
    del requests
    try:
        # The call is routed during its first step: the span is the current context then,
        # and only then (a context attached across yields could be detached by another task).
        token = _otel.attach(_otel.set_span_in_context(span))
        ingress = _ingress.set((span, rpc_method))
        try:
            first = await anext(calls, None)
        finally:
            _ingress.reset(ingress)
            _otel.detach(token)
        if first is not None:
            yield first
            async for item in calls:
                yield item
    finally:
        await calls.aclose()  # type: ignore[attr-defined]  # an async generator
        code = context.code()
        name = getattr(code, "name", None) or "OK"
        span.set_attribute("rpc.grpc.status_code", name)
        if name == "OK":
            span.set_status(_otel.ok)
        else:
            span.set_status(_otel.Status(_otel.error_code, f"gRPC {name}"))
        span.end()


def start_route(request: Any, app_name: str, deployment: str) -> None:
    """A handle call was made: its ``route_to_replica`` span (child of the current context),
    whose context travels to the replica in the request's envelope."""
    envelope = request.envelope
    ingress = _ingress.get()
    method = envelope.method
    if ingress is not None and method in (ASGI_METHOD, GRPC_METHOD):
        method = ingress[1]  # what the client called, not how the proxy forwards it
    span = _start(
        "route_to_replica",
        _otel.client,
        _otel.get_current(),
        {
            "request_id": envelope.request_id,
            "app": app_name,
            "deployment": deployment,
            "call_method": method,
            "multiplexed_model_id": envelope.model_id,
        },
    )
    carrier: dict[str, str] = {}
    _otel.propagator.inject(carrier, context=_otel.set_span_in_context(span))
    envelope.trace_context = carrier
    request.span = span
    if ingress is not None:
        ingress[0].set_attribute("request_id", envelope.request_id)


def end_route(request: Any, error: BaseException | None) -> None:
    """The call's outcome is known: end its span (once, even for broadcast copies)."""
    span = request.span
    if not span.is_recording():
        return
    attempt = request.attempt
    if attempt is not None:  # app#deployment#tag: the tag, as the replica's span has it
        span.set_attribute("replica_id", attempt.replica.replica_id.rsplit("#", 1)[-1])
    if error is not None:
        span.set_status(_otel.Status(_otel.error_code, f"{type(error).__name__}: {error}"))
    span.end()


def start_replica(
    request: Any,
    carrier: Mapping[str, str],
    method: str,
    args: Any,
    replica_tag: str,
    stream: bool,
) -> None:
    """The replica runs a request: its ``replica_handle_request`` span becomes the current
    context of the request's task (nested calls, and ``get_trace_context()``, see it)."""
    attributes: dict[str, Any] = {
        "request_id": request.request_id,
        "replica_id": replica_tag,
        "deployment": request.deployment,
        "app": request.app_name,
        "multiplexed_model_id": request.multiplexed_model_id,
        "is_streaming": stream,
    }
    call_method = method
    if method == ASGI_METHOD and args and isinstance(args[0], dict):
        scope = args[0]
        call_method = "__call__"
        route = scope.get("root_path", "") + scope.get("path", "")
        attributes.update(
            {"route": route, "http.method": scope.get("method", "WS"), "http.route": route}
        )
    elif method == GRPC_METHOD and args and isinstance(args[0], str):
        call_method = args[0].rsplit("/", 1)[-1]
        attributes.update({"rpc.system": "grpc", "rpc.method": call_method})
    attributes["call_method"] = call_method
    span = _start(
        f"replica_handle_request {request.deployment} {call_method}",
        _otel.server,
        _remote_parent(carrier),
        attributes,
    )
    request.trace = (span, _otel.attach(_otel.set_span_in_context(span)))


def enter_request(request: Any) -> None:
    """Make ``request``'s span the current context (of a fresh context run for it: a batch
    runs in one, on behalf of its first caller, as Ray's BatchTraceContextManager does)."""
    _otel.attach(_otel.set_span_in_context(request.trace[0]))


def end_replica(request: Any, error: Any) -> None:
    """The request's outcome is known: ``error`` describes an error answer (type_name, message,
    traceback: a ``serve._rpc.replica_stream.ErrorReply``), else None (a result, or the stream
    is gone). An error is recorded as an exception event; the status stays unset, as Ray's."""
    span, token = request.trace
    request.trace = None
    _otel.detach(token)
    if error is not None:
        span.add_event(
            "exception",
            {
                "exception.type": error.type_name or "Exception",
                "exception.message": error.message,
                "exception.stacktrace": error.traceback,
            },
        )
    span.end()
