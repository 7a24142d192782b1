"""Ray Serve's deployment-handle programming model on asyncio and gRPC, without Ray.

``import serve`` stands in for ``from ray import serve``::

    import serve

    @serve.deployment
    class Hello:
        def __call__(self, name: str) -> str:
            return f"Hello {name}!"

    handle = serve.run(Hello.bind())
    assert handle.remote("world").result() == "Hello world!"
"""

from serve import (
    context as context,  # the public modules, as ray.serve.context ...
    metrics as metrics,
)
from serve._api import (
    RunTarget,
    delete,
    get_app_handle,
    get_deployment_handle,
    run,
    run_many,
    shutdown,
    shutdown_async,
    start,
    status,
)
from serve._batching import batch
from serve._context import get_multiplexed_model_id, get_replica_context
from serve._deployment import Application, Deployment, deployment
from serve._ingress import ingress
from serve._multiplex import multiplexed
from serve._starlette_hook import install as _install_starlette_hook
from serve._tracing import get_trace_context
from serve.schema import TracingConfig

_install_starlette_hook()

__version__ = "0.1.0"

__all__ = [
    "Application",
    "Deployment",
    "RunTarget",
    "TracingConfig",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_trace_context",
    "ingress",
    "multiplexed",
    "run",
    "run_many",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
]
