"""serve._tracing's spans in one process, exported to memory: parents, the carrier, sampling
decided at the root, batches on behalf of their first caller. (The e2e tests follow traces
across real processes.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from serve import _tracing
from serve._batch_queue import _context_with
from serve._context import RequestContext
from serve._exchange import Connection
from serve._models import ReplicaInfo
from serve._options import HandleOptions
from serve._request import Attempt, Request
from serve._serialization import CLOUDPICKLE, encode

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Tracing on in this process (sampling 0 at roots), without touching OpenTelemetry's
    global provider; the finished spans."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(_tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(_tracing, "_otel", _tracing._Otel())
    monkeypatch.setattr(_tracing, "enabled", True)
    yield memory
    provider.shutdown()


def call(parent: RequestContext | None = None) -> Request:
    request = Request(
        1, HandleOptions(method_name="predict"), (1,), {}, parent=parent, on_cancel=lambda *a: None
    )
    _tracing.start_route(request, "app", "Model")
    return request


def serving(carrier: dict[str, str]) -> RequestContext:
    """A replica serving a request that came with ``carrier``: its span is current."""
    request = RequestContext(request_id="r1", app_name="app", deployment="Ingress")
    _tracing.start_replica(request, carrier, "__call__", (), "tag1", False)
    return request


def test_a_sampled_client_is_followed_and_nested_calls_are_children(spans: Any) -> None:
    ingress = serving({"traceparent": SAMPLED})
    nested = call(ingress)
    assert nested.envelope.trace_context is not None
    assert int(nested.envelope.trace_context["traceparent"].rsplit("-", 1)[1], 16) & 0x01
    # Sent to that replica (the span reads only the attempt's replica, not its connection).
    nested.attempt = Attempt(ReplicaInfo("app#Model#tag2", "addr"), cast(Connection, None), 1)
    _tracing.end_route(nested, None)
    _tracing.end_replica(ingress, None)
    route, replica = spans.get_finished_spans()
    assert replica.name == "replica_handle_request Ingress __call__"
    assert replica.parent.span_id == 0xB7AD6B7169203331
    assert route.name == "route_to_replica"
    assert route.parent.span_id == replica.context.span_id
    assert route.attributes["replica_id"] == "tag2"
    assert route.attributes["call_method"] == "predict"
    assert nested.envelope.trace_context["traceparent"].split("-")[2] == (
        f"{route.context.span_id:016x}"
    )


def test_the_root_decides_sampling_and_its_decision_travels(spans: Any) -> None:
    for carrier in ({}, {"traceparent": UNSAMPLED}, {"traceparent": "garbage"}):
        request = serving(carrier)
        nested = call(request)
        assert nested.envelope.trace_context is not None
        # Not sampled here (ratio 0 at a root, or an unsampled parent): nor downstream.
        flags = int(nested.envelope.trace_context["traceparent"].rsplit("-", 1)[1], 16)
        assert flags & 0x01 == 0
        _tracing.end_route(nested, None)
        _tracing.end_replica(request, None)
    assert spans.get_finished_spans() == ()


def test_a_batch_runs_on_behalf_of_its_first_caller(spans: Any) -> None:
    first = serving({"traceparent": SAMPLED})
    # The batch's task context is made elsewhere (the batcher's own task): no span current.
    token = _tracing._otel.attach(_tracing._otel.set_span_in_context(None))
    try:
        batch_context = _context_with(first, (first,))
    finally:
        _tracing._otel.detach(token)
    nested = batch_context.run(call, first)
    _tracing.end_route(nested, ValueError("boom"))
    _tracing.end_replica(first, None)
    route, replica = spans.get_finished_spans()
    assert route.parent.span_id == replica.context.span_id
    assert route.status.status_code.name == "ERROR"
    assert "ValueError: boom" in route.status.description


def test_a_user_error_is_an_exception_event(spans: Any) -> None:
    from serve._rpc.replica_stream import ErrorKind, ErrorReply

    request = serving({"traceparent": SAMPLED})
    outcome = ErrorReply.of(ValueError("bad input"), ErrorKind.USER)
    _tracing.end_replica(request, outcome)
    (replica,) = spans.get_finished_spans()
    (event,) = replica.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "ValueError"
    assert "bad input" in event.attributes["exception.message"]
    assert replica.status.status_code.name == "UNSET"  # as Ray's


def test_encoded_arguments_are_untouched() -> None:
    # Tracing off: no span, no carrier on the envelope.
    request = Request(1, HandleOptions(), (1,), {}, parent=None, on_cancel=lambda *a: None)
    assert request.span is None
    assert request.envelope.trace_context is None
    assert request.envelope.args == encode(CLOUDPICKLE, (1,))
