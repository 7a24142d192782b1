"""OpenTelemetry traces through a three-deployment graph, called over HTTP and gRPC through
serve-proxy: Ray's span names, parents across processes, the client's traceparent continued,
sampling decided at the root; spans read from the default exporter's files and from an OTLP
collector."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import serve
from tests.support import greeter_pb2, greeter_pb2_grpc
from tests.support.otlp_collector import OtlpCollector
from tests.support.procs import (
    PROXY_ARGS,
    StandaloneController,
    python_env,
    run_script,
    wait_for,
    wait_routed,
)

pytestmark = pytest.mark.e2e

GREETER = "tests.support.greeter_pb2_grpc.add_GreeterServicer_to_server"
DEFAULT_EXPORTER = "serve._tracing:default_tracing_exporter"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"

# Ingress -> Preprocess -> Model, then Ingress -> Model: nested calls in a known order, and a
# span of the user's own under the replica's (serve.get_trace_context()).
DEPLOY = textwrap.dedent(
    """
    import serve
    from serve.handle import DeploymentHandle

    @serve.deployment
    class Model:
        def predict(self, x):
            from opentelemetry import trace

            tracer = trace.get_tracer("user")
            with tracer.start_as_current_span("model_inference", context=serve.get_trace_context()):
                return x * 2

    @serve.deployment
    class Preprocess:
        def __init__(self, model: DeploymentHandle):
            self.model = model

        async def __call__(self, x):
            return await self.model.predict.remote(x + 1)

    @serve.deployment
    class Ingress:
        def __init__(self, pre: DeploymentHandle, model: DeploymentHandle):
            self.pre = pre
            self.model = model

        async def __call__(self, request):
            x = int(request.query_params.get("x", "1"))
            pre = await self.pre.remote(x)
            return str(await self.model.predict.remote(pre))

    @serve.deployment
    class Greeter:
        def __init__(self, model: DeploymentHandle):
            self.model = model

        async def SayHello(self, request):
            from tests.support import greeter_pb2

            value = await self.model.predict.remote(len(request.name))
            return greeter_pb2.HelloReply(message=f"{request.name} {value}")

    model = Model.bind()
    serve.run(Ingress.bind(Preprocess.bind(model), model), name="graph", route_prefix="/")
    serve.run(Greeter.bind(Model.bind()), name="greet", route_prefix="/greet")
    details = list(serve.status().proxy_details.values())[0]
    print(details.http_address, details.grpc_address)
    """
)


def start_traced(tmp_path: Path, exporter: str, ratio: str, **env: str) -> StandaloneController:
    controller = StandaloneController(
        tmp_path / "state",
        *PROXY_ARGS,
        "--grpc-port",
        "0",
        "--grpc-servicer-functions",
        GREETER,
        SERVE_TRACING_EXPORTER_IMPORT_PATH=exporter,
        SERVE_TRACING_SAMPLING_RATIO=ratio,
        **env,
    )
    return controller.start()


def deploy(controller: StandaloneController) -> tuple[str, str]:
    """Deploy the graph and the Greeter; the proxy's HTTP and gRPC addresses."""
    result = run_script(DEPLOY, timeout_s=120, env=controller.driver_env())
    assert result.returncode == 0, result.stderr
    http, grpc_address = result.stdout.split()[-2:]
    wait_routed(http, "/", "/greet")  # the proxy learns routes a moment after serve.run returns
    return http, grpc_address


def get(http: str, path: str, traceparent: str | None = None) -> str:
    headers = {"traceparent": traceparent} if traceparent else {}
    request = urllib.request.Request(f"http://{http}{path}", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def file_spans(controller: StandaloneController) -> list[dict[str, Any]]:
    """Every span the default exporter wrote, from every process's file."""
    spans = []
    for path in sorted((controller.state_dir / "logs" / "spans").glob("*_tracing.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


def trace_of(spans: list[dict[str, Any]], trace_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["context"]["trace_id"] == "0x" + trace_id]


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    """The spans whose parent is ``parent``, in the order they started."""
    found = [s for s in spans if s["parent_id"] == parent["context"]["span_id"]]

    def started(span: dict[str, Any]) -> Any:
        return span.get("start_time") or span.get("start_time_unix_nano")

    return sorted(found, key=started)


def only(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    named = [s for s in spans if s["name"] == name]
    assert len(named) == 1, (name, [s["name"] for s in spans])
    return named[0]


def check_http_tree(trace: list[dict[str, Any]]) -> None:
    """The graph's spans: proxy -> Ingress -> (Preprocess -> Model), then Model."""
    proxy = only(trace, "proxy_http_request")
    assert proxy["attributes"]["app"] == "graph"
    assert proxy["attributes"]["http.status_code"] == 200
    (to_ingress,) = children(trace, proxy)
    assert to_ingress["name"] == "route_to_replica"
    assert to_ingress["attributes"]["deployment"] == "Ingress"
    (ingress,) = children(trace, to_ingress)
    assert ingress["name"] == "replica_handle_request Ingress __call__"
    assert ingress["attributes"]["replica_id"] == to_ingress["attributes"]["replica_id"]
    to_pre, to_model = children(trace, ingress)
    assert (to_pre["name"], to_pre["attributes"]["deployment"]) == (
        "route_to_replica",
        "Preprocess",
    )
    assert (to_model["name"], to_model["attributes"]["deployment"]) == ("route_to_replica", "Model")
    (pre,) = children(trace, to_pre)
    assert pre["name"] == "replica_handle_request Preprocess __call__"
    (pre_to_model,) = children(trace, pre)
    (model_in_pre,) = children(trace, pre_to_model)
    assert model_in_pre["name"] == "replica_handle_request Model predict"
    assert [s["name"] for s in children(trace, model_in_pre)] == ["model_inference"]
    (model,) = children(trace, to_model)
    assert model["name"] == "replica_handle_request Model predict"
    assert len(trace) == 11  # nothing else in the trace
    # One request id throughout.
    ids = {s["attributes"].get("request_id") for s in trace if s["name"] != "model_inference"}
    assert len(ids) == 1
    assert None not in ids


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[StandaloneController]:
    controller = start_traced(tmp_path, DEFAULT_EXPORTER, "1.0")
    try:
        yield controller
    finally:
        controller.cleanup()


def test_http_request_is_one_trace_through_the_graph(traced: StandaloneController) -> None:
    http, _ = deploy(traced)
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert get(http, "/?x=3", traceparent) == "16"  # ((3 + 1) * 2) * 2
    for x in range(3):
        get(http, f"/?x={x}")

    def four_traces() -> list[dict[str, Any]] | None:
        spans = file_spans(traced)
        proxies = [s for s in spans if s["name"] == "proxy_http_request"]
        complete = len(proxies) == 4 and len(spans) == 44
        return spans if complete else None

    spans = wait_for(four_traces, timeout_s=30)
    # The client's trace is continued: its span is the parent of the proxy's.
    continued = trace_of(spans, CLIENT_TRACE)
    assert only(continued, "proxy_http_request")["parent_id"] == "0x" + CLIENT_SPAN
    check_http_tree(continued)
    # Without a traceparent, each request is a trace of its own, rooted at the proxy.
    roots = [s for s in spans if s["name"] == "proxy_http_request" and s["parent_id"] is None]
    assert len(roots) == 3
    for root in roots:
        check_http_tree(trace_of(spans, root["context"]["trace_id"][2:]))
    # Written by one file per process: the proxy's and each replica's.
    names = sorted(p.name for p in (traced.state_dir / "logs" / "spans").iterdir())
    assert any(n.startswith("proxy_") for n in names)
    assert any(n.startswith("replica_graph_Model_") for n in names)


def test_sampling_zero_writes_nothing_but_honours_a_sampled_client(tmp_path: Path) -> None:
    controller = start_traced(tmp_path, DEFAULT_EXPORTER, "0.0")
    try:
        http, _ = deploy(controller)
        for x in range(5):
            get(http, f"/?x={x}")
        unsampled = f"00-{'1' * 32}-{CLIENT_SPAN}-00"
        get(http, "/?x=1", unsampled)
        # The root decides: a client that sampled its trace gets it traced all the way down.
        sampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        get(http, "/?x=1", sampled)
        spans = wait_for(lambda: (s := file_spans(controller)) and len(s) == 11 and s, timeout_s=30)
        assert {s["context"]["trace_id"] for s in spans} == {"0x" + CLIENT_TRACE}
        check_http_tree(spans)
    finally:
        controller.cleanup()


def test_spans_reach_an_otlp_collector_over_grpc(tmp_path: Path) -> None:
    with OtlpCollector() as collector:
        controller = start_traced(
            tmp_path,
            "examples.otlp_exporter:otlp",  # the docs' exporter
            "1.0",
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="200",  # ms between batches (default 5 s)
        )
        try:
            http, grpc_address = deploy(controller)
            assert get(http, "/?x=3", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01") == "16"
            grpc_trace = "2" * 32
            with grpc.insecure_channel(grpc_address) as channel:
                reply = greeter_pb2_grpc.GreeterStub(channel).SayHello(
                    greeter_pb2.HelloRequest(name="Ada"),
                    metadata=(
                        ("application", "greet"),
                        ("traceparent", f"00-{grpc_trace}-{CLIENT_SPAN}-01"),
                    ),
                    timeout=30,
                )
            assert reply.message == "Ada 6"
            http_spans = wait_for(
                lambda: len(t := trace_of(collector.spans(), CLIENT_TRACE)) == 11 and t,
                timeout_s=30,
            )
            check_http_tree(http_spans)
            grpc_spans = wait_for(
                lambda: len(t := trace_of(collector.spans(), grpc_trace)) == 6 and t,
                timeout_s=30,
            )
        finally:
            controller.cleanup()
    proxy = only(grpc_spans, "proxy_grpc_request")
    assert proxy["parent_id"] == "0x" + CLIENT_SPAN
    assert proxy["attributes"]["rpc.method"] == "SayHello"
    assert proxy["attributes"]["rpc.grpc.status_code"] == "OK"
    (route,) = children(grpc_spans, proxy)
    assert route["attributes"]["call_method"] == "SayHello"
    (greeter,) = children(grpc_spans, route)
    assert greeter["name"] == "replica_handle_request Greeter SayHello"
    (to_model,) = children(grpc_spans, greeter)
    (model,) = children(grpc_spans, to_model)
    assert model["name"] == "replica_handle_request Model predict"
    assert not (controller.state_dir / "logs" / "spans").exists()  # nothing went to files


def test_a_wrong_exporter_fails_serve_start_before_anything_starts() -> None:
    with pytest.raises(ImportError, match="no_such_module"):
        serve.start(
            tracing_config=serve.TracingConfig(
                enabled=True, exporter_import_path="no_such_module:exporter"
            )
        )
    with pytest.raises(TypeError, match="take no arguments"):
        serve.start(tracing_config={"enabled": True, "exporter_import_path": "json:dumps"})
    with pytest.raises(ValueError, match=r"sampling_ratio must be between 0\.0 and 1\.0"):
        serve.TracingConfig(sampling_ratio=2)
    with pytest.raises(ValueError, match="unknown field"):
        serve.start(tracing_config={"enabeld": True})


def test_a_controller_with_a_wrong_exporter_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(SERVE_TRACING_EXPORTER_IMPORT_PATH="no_such_module:exporter"),
        check=False,
    )
    assert result.returncode == 2
    assert "SERVE_TRACING_EXPORTER_IMPORT_PATH='no_such_module:exporter'" in result.stderr
    assert "cannot import module 'no_such_module'" in result.stderr
