"""``@serve.deployment``, ``Deployment`` (``.options``, ``.bind``) and bound application graphs."""

from __future__ import annotations

import dataclasses
import inspect
import io
import pickle
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import cloudpickle

from serve._ingress import has_asgi_app
from serve._models import DeploymentConfig
from serve._options import (
    DEFAULT,
    build_deployment_config,
    validate_deployment_options,
)
from serve._serialization import dumps_code
from serve.exceptions import ServeError

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
        backpressure_config: Any = _UNSET,
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
    backpressure_config: Any = _UNSET,
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
    Options that do not exist, or bad values, raise at decoration time. The same options can be
    changed later with ``Deployment.options()`` or in a config file's ``deployments:``.

    Example::

        @serve.deployment(max_ongoing_requests=10)
        class Echo:
            async def __call__(self, text: str) -> str:
                return text

    Args:
        name: the deployment's name in its application (default: the class or function name).
        version: a code version; while it stays the same, a redeploy keeps the running
            replicas and applies config changes in place (default: none, so ``serve.run``
            replaces them; a config file's deploy derives one from the code).
        num_replicas: how many replicas run (default 1), or ``"auto"`` to autoscale with Ray's
            defaults for ``autoscaling_config``.
        route_prefix: accepted and checked, as Ray's older spelling; the application's
            ``route_prefix`` (``serve.run``, the config file) decides where it is served.
        ray_actor_options: Ray's actor options: ``num_cpus`` (default 1), ``num_gpus``,
            ``memory`` and ``resources`` size and place the replica (a Slurm job's request);
            ``runtime_env`` takes ``env_vars``, a local ``working_dir`` and ``py_modules``.
        placement_group_bundles: validated and recorded; not enforced (no Ray placement groups).
        placement_group_strategy: validated and recorded, as ``placement_group_bundles``.
        max_replicas_per_node: at most this many of the deployment's replicas on one node
            (default: no limit).
        user_config: JSON-able data handed to the replicas' ``reconfigure(user_config)``; a
            change alone is applied in place, without restarting replicas.
        max_ongoing_requests: requests one replica runs at once; more wait in the callers'
            queues (default 5).
        max_queued_requests: requests one handle queues while no replica has room; more fail
            at once with ``BackPressureError`` (default -1: no limit).
        autoscaling_config: a dict or ``serve.config.AutoscalingConfig``: replicas follow the
            load between ``min_replicas`` and ``max_replicas`` (default: a fixed count).
        graceful_shutdown_wait_loop_s: accepted, as Ray's (default 2); a draining replica here
            rejects new requests at once, to be retried elsewhere.
        graceful_shutdown_timeout_s: how long a stopping replica may finish its requests
            before it is killed (default 20).
        health_check_period_s: how often the controller checks each replica (default 10).
        health_check_timeout_s: a check not answered this long fails; three failures in a row
            replace the replica (default 30).
        logging_config: a dict or ``serve.schema.LoggingConfig``: the replicas' log level,
            encoding (``TEXT`` or ``JSON``) and access log.
        request_router_config: a dict or ``serve.config.RequestRouterConfig`` naming a custom
            ``RequestRouter`` (default: power of two choices).
        backpressure_config: a dict or ``serve.config.BackpressureConfig``: the HTTP status
            (503 or 429) and ``Retry-After`` of a request dropped by ``max_queued_requests``.
        request_router_class: Ray's older spelling of ``request_router_config``'s field.
        request_router_kwargs: Ray's older spelling of ``request_router_config``'s field.
        request_routing_stats_period_s: Ray's older spelling of ``request_router_config``'s
            field.
        request_routing_stats_timeout_s: Ray's older spelling of ``request_router_config``'s
            field.
        max_constructor_retry_count: failed replica starts tolerated before the deploy fails
            (default 20; Ray's limit is ``min(3 * num_replicas, this)``).
        rolling_update_percentage: the share of replicas a new version replaces at a time
            (default 0.2, at least one replica).
        max_surge_percent: with more than 0, replacements start first, up to this percentage
            above the target, so capacity never dips (default 0: old replicas stop first).
        placement_group_bundle_label_selector: validated and recorded, as placement groups.
        gang_scheduling_config: a dict or ``serve.config.GangSchedulingConfig``: replicas
            placed, started and restarted in gangs of ``gang_size``.
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
    _check_single_asgi_ingress(built, app_name)
    return ingress, built


def _check_single_asgi_ingress(built: list[BuiltDeployment], app_name: str) -> None:
    """As Ray: one application serves HTTP through at most one @serve.ingress app."""
    asgi = [b.name for b in built if has_asgi_app(b.deployment.func_or_class)]
    if len(asgi) > 1:
        raise ServeError(
            f'Found multiple FastAPI deployments in application "{app_name}". Please only '
            "include one deployment with @serve.ingress in your application to avoid this "
            f"issue (found {asgi})."
        )


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
