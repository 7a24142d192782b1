"""A tracing exporter function: spans to an OpenTelemetry collector over OTLP/gRPC.

Name it where the controller starts; proxies and replicas import it, so it must be importable
there (the same path on every node)::

    OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4317 \\
    SERVE_TRACING_EXPORTER_IMPORT_PATH=examples.otlp_exporter:otlp serve start

It needs ``pip install 'rayless-serve[tracing-otlp]'``. The e2e tracing test sends spans
through it to a collector it runs.
"""

# --8<-- [start:exporter]
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanProcessor


def otlp() -> list[SpanProcessor]:
    """No arguments; returns the span processors. The OTEL_EXPORTER_OTLP_* and OTEL_BSP_*
    environment variables configure them (endpoint, headers, batch delay)."""
    return [BatchSpanProcessor(OTLPSpanExporter())]


# --8<-- [end:exporter]
