"""``@serve.deployment``, ``Deployment`` (``.options``, ``.bind``) and bound application graphs."""

from __future__ import annotations

import dataclasses
import inspect
import io
import pickle
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import cloudpickle

from serve._models import DeploymentConfig
from serve._options import (
    DEFAULT,
    build_deployment_config,
    validate_deployment_options,
)
from serve._serialization import dumps_code

T = TypeVar("T")

_UNSET: Any = DEFAULT.VALUE


class Deployment(Generic[T]):
    """A class or function with serve options; ``.bind()`` it to make an ``Application``.

    Example::

        @serve.deployment(num_replicas=2)
        class Model:
            def __call__(self, x):
                return x * 2

        app = Model.bind()
    """

    def __init__(self, func_or_class: Callable[..., T], options: dict[str, Any]) -> None:
        if not (
            inspect.isclass(func_or_class) or inspect.isfunction(inspect.unwrap(func_or_class))
        ):
            raise TypeError(
                "@serve.deployment must decorate a class or a function, got "
                f"{type(func_or_class).__name__}."
            )
        try:  # as Ray does: a class replicas could never receive fails where it is written
            dumps_code(func_or_class)
        except Exception as exc:
            raise TypeError(
                f"@serve.deployment: {getattr(func_or_class, '__qualname__', func_or_class)!r} "
                f"cannot be serialized, and replicas receive it serialized: {exc}. Keep "
                "unpicklable objects (locks, connections, clients) out of class attributes and "
                "globals it uses; create them in __init__."
            ) from exc
        self._func_or_class = func_or_class
        self._options = dict(options)
        self._config: DeploymentConfig = build_deployment_config(self._options)

    @property
    def name(self) -> str:
        return str(self._options.get("name") or self._func_or_class.__name__)

    @property
    def func_or_class(self) -> Callable[..., T]:
        return self._func_or_class

    @property
    def version(self) -> str | None:
        return self._options.get("version")

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def num_replicas(self) -> int | str | None:
        return self._options.get("num_replicas", self._config.num_replicas)

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def autoscaling_config(self) -> Any:
        return self._config.autoscaling_config

    @property
    def ray_actor_options(self) -> dict[str, Any] | None:
        return self._options.get("ray_actor_options")

    @property
    def route_prefix(self) -> str | None:
        return self._options.get("route_prefix")

    def options(
        self,
        *,
        func_or_class: Any = _UNSET,
        name: Any = _UNSET,
        version: Any = _UNSET,
        num_replicas: Any = _UNSET,
        route_prefix: Any = _UNSET,
        ray_actor_options: Any = _UNSET,
        placement_group_bundles: Any = _UNSET,
        placement_group_strategy: Any = _UNSET,
        max_replicas_per_node: Any = _UNSET,
        user_config: Any = _UNSET,
        max_ongoing_requests: Any = _UNSET,
        max_queued_requests: Any = _UNSET,
        autoscaling_config: Any = _UNSET,
        graceful_shutdown_wait_loop_s: Any = _UNSET,
        graceful_shutdown_timeout_s: Any = _UNSET,
        health_check_period_s: Any = _UNSET,
        health_check_timeout_s: Any = _UNSET,
        logging_config: Any = _UNSET,
        request_router_config: Any = _UNSET,
        request_router_class: Any = _UNSET,
        request_router_kwargs: Any = _UNSET,
        request_routing_stats_period_s: Any = _UNSET,
        request_routing_stats_timeout_s: Any = _UNSET,
        max_constructor_retry_count: Any = _UNSET,
        rolling_update_percentage: Any = _UNSET,
        max_surge_percent: Any = _UNSET,
        placement_group_bundle_label_selector: Any = _UNSET,
        gang_scheduling_config: Any = _UNSET,
    ) -> Deployment[T]:
        """A copy with the given options changed; the original is not modified."""
        given = {k: v for k, v in locals().items() if k not in ("self", "func_or_class")}
        changes = validate_deployment_options(given)
        merged = {**self._options, **changes}
        # Switching between a fixed count and autoscaling replaces the other setting.
        if (
            "autoscaling_config" in changes
            and "num_replicas" not in changes
            and merged.get("num_replicas") != "auto"
            and changes["autoscaling_config"] is not None
        ):
            merged.pop("num_replicas", None)
        if (
            "num_replicas" in changes
            and "autoscaling_config" not in changes
            and changes["num_replicas"] not in ("auto", None)
        ):
            merged.pop("autoscaling_config", None)
        target = self._func_or_class if func_or_class is _UNSET else func_or_class
        return Deployment(target, merged)

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments; other bound applications become DeploymentHandles."""
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"Deployment {self.name!r} cannot be called directly. Use "
            f"`{self.name}.bind(...)` to build an application and `serve.run(app)` to deploy it."
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r})"


class Application:
    """A deployment bound to its constructor arguments: the input of ``serve.run``."""

    def __init__(self, deployment: Deployment[Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._bound_deployment = deployment
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment[Any]:
        return self._bound_deployment

    def __repr__(self) -> str:
        return f"Application(deployment={self._bound_deployment.name!r})"


def deployment(
    _func_or_class: Any = None,
    name: Any = _UNSET,
    version: Any = _UNSET,
    num_replicas: Any = _UNSET,
    route_prefix: Any = _UNSET,
    ray_actor_options: Any = _UNSET,
    placement_group_bundles: Any = _UNSET,
    placement_group_strategy: Any = _UNSET,
    max_replicas_per_node: Any = _UNSET,
    user_config: Any = _UNSET,
    max_ongoing_requests: Any = _UNSET,
    max_queued_requests: Any = _UNSET,
    autoscaling_config: Any = _UNSET,
    graceful_shutdown_wait_loop_s: Any = _UNSET,
    graceful_shutdown_timeout_s: Any = _UNSET,
    health_check_period_s: Any = _UNSET,
    health_check_timeout_s: Any = _UNSET,
    logging_config: Any = _UNSET,
    request_router_config: Any = _UNSET,
    request_router_class: Any = _UNSET,
    request_router_kwargs: Any = _UNSET,
    request_routing_stats_period_s: Any = _UNSET,
    request_routing_stats_timeout_s: Any = _UNSET,
    max_constructor_retry_count: Any = _UNSET,
    rolling_update_percentage: Any = _UNSET,
    max_surge_percent: Any = _UNSET,
    placement_group_bundle_label_selector: Any = _UNSET,
    gang_scheduling_config: Any = _UNSET,
) -> Any:
    """Turn a class or function into a ``Deployment``.

    Works bare (``@serve.deployment``) or with options (``@serve.deployment(num_replicas=2)``).
    Options that do not exist, or bad values, raise at decoration time.

    Example::

        @serve.deployment(max_ongoing_requests=10)
        class Echo:
            async def __call__(self, text: str) -> str:
                return text
    """
    if isinstance(_func_or_class, str):  # @serve.deployment("name"), as Ray accepts
        if name is not _UNSET:
            raise TypeError(
                "serve.deployment: the name was given twice (positionally and as name=)."
            )
        name, _func_or_class = _func_or_class, None
    given = {k: v for k, v in locals().items() if k != "_func_or_class"}
    options = validate_deployment_options(given)
    build_deployment_config(options)  # fail now on inconsistent combinations

    def decorate(func_or_class: Callable[..., T]) -> Deployment[T]:
        return Deployment(func_or_class, options)

    if _func_or_class is not None:
        return decorate(_func_or_class)
    return decorate


@dataclasses.dataclass(frozen=True)
class BuiltDeployment:
    """One deployment of a built application, its bound applications replaced by handles."""

    name: str
    deployment: Deployment[Any]
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]


def build_application(
    app: Application, app_name: str, make_handle: Callable[[str, str], Any]
) -> tuple[str, list[BuiltDeployment]]:
    """Walk a bound graph: one deployment per distinct bound node; returns (ingress, deployments).

    The same bound node used twice is one deployment; two different nodes with the same name get
    suffixes (``Model``, ``Model_1``), as in Ray. ``make_handle(name, app)`` builds the handle
    that replaces a bound node inside another node's arguments.
    """
    if not isinstance(app, Application):
        raise TypeError(
            f"serve.run expects an Application built with Deployment.bind(), got "
            f"{type(app).__name__}. Did you forget to call .bind()?"
        )
    names: dict[int, str] = {}
    taken: set[str] = set()
    built: list[BuiltDeployment] = []

    def visit(node: Application) -> str:
        key = id(node)
        if key in names:
            return names[key]
        base = node.deployment.name
        name, suffix = base, 0
        while name in taken:
            suffix += 1
            name = f"{base}_{suffix}"
        taken.add(name)
        names[key] = name
        args = tuple(replace(a) for a in node._args)
        kwargs = {k: replace(v) for k, v in node._kwargs.items()}
        built.append(BuiltDeployment(name, node.deployment, args, kwargs))
        return name

    def replace(value: Any) -> Any:
        if isinstance(value, Application):
            return make_handle(visit(value), app_name)
        if isinstance(value, Deployment):
            raise TypeError(
                f"Deployment {value.name!r} was passed as an argument without .bind(); pass "
                f"{value.name}.bind(...) so it is deployed and arrives as a DeploymentHandle."
            )
        kind = type(value)
        if kind is list:
            return [replace(v) for v in value]
        if kind is tuple:
            return tuple(replace(v) for v in value)
        if kind is dict:
            return {k: replace(v) for k, v in value.items()}
        if kind in _PLAIN:
            return value
        return _replace_nested(value, replace)

    ingress = visit(app)
    return ingress, built


_PLAIN = frozenset({str, bytes, int, float, bool, type(None), set, frozenset})


def _replace_nested(value: Any, replace: Callable[[Any], Any]) -> Any:
    """Replace bound deployments found anywhere inside a custom object (an attribute, a
    dataclass field...), as Ray does: pickle it, noting each Application met, then unpickle it
    with each replaced. Returns ``value`` itself when it holds none (or cannot be pickled, in
    which case serializing the arguments reports the problem)."""
    found: list[Application] = []

    class Scanner(cloudpickle.Pickler):  # type: ignore[misc]
        def persistent_id(self, obj: Any) -> int | None:
            if isinstance(obj, Application):
                found.append(obj)
                return len(found) - 1
            return None

    buffer = io.BytesIO()
    try:
        Scanner(buffer, protocol=5).dump(value)
    except Exception:
        return value
    if not found:
        return value
    replacements = [replace(app) for app in found]

    class Loader(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            return replacements[pid]

    return Loader(io.BytesIO(buffer.getvalue())).load()
