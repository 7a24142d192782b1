"""The FastAPI routes a ``@serve.ingress`` class declares on its methods, bound to the replica's
instance once, when the replica starts.

``@app.get("/") def root(self)`` registers the function, ``self`` among its parameters. Each such
route is rebuilt around the method bound to the instance (``types.MethodType``: FastAPI reads the
other parameters from its signature, and a coroutine, generator or plain function stays one),
by the route's own class from the options it was built with, as FastAPI's ``include_router``
copied routes. The rebuilt routes go after the app's other routes, where Ray's
``include_router`` puts them. The app is then served as it is: no router level added (FastAPI
0.160's ``include_router`` nests one, matched again on every request), no dependency solved and
no context looked up per request to find the instance.

FastAPI is imported only when a replica serves a FastAPI app.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from serve.exceptions import ServeError


def bind_class_routes(app: Any, instance: Any) -> Any:
    """Make the FastAPI routes declared on ``instance``'s class run on ``instance``.

    Routes of other classes are dropped: one app may serve several deployments, each its own
    routes. Any other app is returned as it is.
    """
    try:
        from fastapi import FastAPI
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:
        return app
    if not isinstance(app, FastAPI):
        return app
    cls = type(instance)
    ours: list[Any] = []
    keep: list[Any] = []
    for route in app.router.routes:
        endpoint = getattr(route, "endpoint", None)
        qualname = getattr(endpoint, "__qualname__", "")
        owner = qualname.rsplit(".", 1)[0] if "." in qualname else ""
        is_method = isinstance(route, APIRoute | APIWebSocketRoute) and not owner.endswith(
            "<locals>"
        )
        name = getattr(endpoint, "__name__", "")
        if is_method and owner.endswith(cls.__qualname__) and hasattr(cls, name):
            ours.append(route)
        elif is_method and owner and _defined_in_class(endpoint):
            continue  # another deployment's route
        else:
            keep.append(route)
    bound = [_rebuilt(route, _bound(route, instance, cls)) for route in ours]
    app.router.routes[:] = keep + bound
    return app


def _bound(route: Any, instance: Any, cls: type) -> Any:
    if not inspect.signature(route.endpoint).parameters:
        raise ServeError(
            f"Route {route.path} of {cls.__name__}: methods of a FastAPI class-based view take "
            "`self` as their first parameter."
        )
    return types.MethodType(route.endpoint, instance)


def _rebuilt(route: Any, endpoint: Any) -> Any:
    """A route like ``route`` around ``endpoint``: built by the route's class with the options
    of the route's kind (``APIRoute`` or ``APIWebSocketRoute``), each as the route holds it."""
    from fastapi.routing import APIRoute, APIWebSocketRoute

    kind = APIRoute if isinstance(route, APIRoute) else APIWebSocketRoute
    options = {
        name: getattr(route, name)
        for name, parameter in inspect.signature(kind.__init__).parameters.items()
        if name not in ("self", "path", "endpoint")
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        and hasattr(route, name)
    }
    return type(route)(route.path, endpoint, **options)


def _defined_in_class(endpoint: Any) -> bool:
    """Whether a route's endpoint is a method (its first parameter is ``self``)."""
    try:
        parameters = list(inspect.signature(endpoint).parameters)
    except (TypeError, ValueError):
        return False
    return bool(parameters) and parameters[0] == "self"
