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

from serve import metrics as metrics  # the public module, as ray.serve.metrics
from serve._api import (
    delete,
    get_app_handle,
    get_deployment_handle,
    run,
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

_install_starlette_hook()

__version__ = "0.1.0"

__all__ = [
    "Application",
    "Deployment",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "ingress",
    "multiplexed",
    "run",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
]
