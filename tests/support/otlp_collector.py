"""A small OTLP/gRPC trace collector for tests, on the ``opentelemetry-proto`` service
definitions, and the exporter function that sends serve's spans to it.

The collector listens on 127.0.0.1:0 and keeps what it receives, flattened to dicts shaped like
the default exporter's JSON lines (name, context, parent_id, attributes), so tests read both
the same way.
"""

from __future__ import annotations

import threading
from concurrent import futures
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OtlpCollector) -> None:
        self._collector = collector

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        spans = []
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        {
                            "name": span.name,
                            "context": {
                                "trace_id": "0x" + span.trace_id.hex(),
                                "span_id": "0x" + span.span_id.hex(),
                            },
                            "parent_id": "0x" + span.parent_span_id.hex()
                            if span.parent_span_id
                            else None,
                            "start_time_unix_nano": span.start_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        }
                    )
        self._collector.add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    """``with OtlpCollector() as c:`` receives spans at ``c.endpoint`` into ``c.spans()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[dict[str, Any]] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server  # generated, untyped
        add(_TraceService(self), self._server)  # type: ignore[no-untyped-call]
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{port}"

    def add(self, spans: list[dict[str, Any]]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._spans)

    def __enter__(self) -> OtlpCollector:
        self._server.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop(grace=None).wait(5)
