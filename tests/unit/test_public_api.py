"""The public surface is explicit and guarded."""

import subprocess
import sys

import serve
import serve.config
import serve.context
import serve.exceptions
import serve.gang
import serve.handle
import serve.metrics
import serve.schema


def test_serve_all_is_sorted_and_complete() -> None:
    assert serve.__all__ == sorted(serve.__all__)
    public = {name for name in dir(serve) if not name.startswith("_")}
    modules = {
        "autoscaling_policy",
        "config",
        "context",
        "exceptions",
        "gang",
        "generated",
        "grpc_util",
        "handle",
        "metrics",
        "request_router",
        "schema",
    }
    assert public - modules == set(serve.__all__)


def test_ray_serve_names_exist() -> None:
    for name in [
        "deployment",
        "run",
        "run_many",
        "RunTarget",
        "start",
        "delete",
        "status",
        "shutdown",
        "shutdown_async",
        "get_app_handle",
        "get_deployment_handle",
        "get_replica_context",
        "get_multiplexed_model_id",
        "Application",
        "Deployment",
        "ingress",
        "context",
        "metrics",
        "TracingConfig",
        "get_trace_context",
    ]:
        assert hasattr(serve, name), name


def test_public_modules_export_what_they_define() -> None:
    import serve.autoscaling_policy
    import serve.grpc_util
    import serve.request_router

    for module in (
        serve.grpc_util,
        serve.handle,
        serve.exceptions,
        serve.config,
        serve.gang,
        serve.metrics,
        serve.schema,
        serve.request_router,
        serve.autoscaling_policy,
    ):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_ray_exception_alias() -> None:
    assert serve.exceptions.RayServeException is serve.exceptions.ServeError
    for name in (
        "BackPressureError",
        "RequestCancelledError",
        "DeploymentUnavailableError",
        "ReplicaDiedError",
    ):
        assert issubclass(getattr(serve.exceptions, name), serve.exceptions.ServeError)


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_serve_does_not_load_opentelemetry() -> None:
    # Tracing is an optional extra, imported only by processes that trace.
    code = (
        "import sys, serve; serve.TracingConfig(); assert serve.get_trace_context() is None; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    assert _run(code) == "[]"


def test_a_replica_loads_no_http_server_unless_it_serves_http_itself() -> None:
    # uvicorn, httptools and websockets cost an idle replica about 6 MB: direct ingress imports
    # them when it is switched on, never the replica's module alone.
    code = (
        "import sys, replica.server; "
        "print(sorted(m for m in ('uvicorn', 'httptools', 'websockets') if m in sys.modules))"
    )
    assert _run(code) == "[]"


def test_starlette_requests_is_reachable_after_a_bare_import_starlette_as_under_ray() -> None:
    # `import serve` alone does not load Starlette (it stays light)...
    assert _run("import sys, serve; print('starlette' in sys.modules)") == "False"
    # ...but `starlette.requests` is there once the program imports starlette, before or after.
    after = "import serve, starlette; print(starlette.requests.Request.__name__)"
    before = "import starlette, serve; print(starlette.requests.Request.__name__)"
    assert _run(after) == _run(before) == "Request"
