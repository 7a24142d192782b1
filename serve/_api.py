"""The module-level API: ``serve.run``, ``delete``, ``status``, ``shutdown``, handle lookups."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import hashlib
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from serve import _client
from serve._client import ServeClient
from serve._context import replica_context
from serve._deployment import Application, BuiltDeployment, build_application
from serve._local import LocalClient
from serve._logging import check_logging_config
from serve._models import ApplicationStatus, CodeEnv, DeploymentID, DeploymentSpec
from serve._options import check_route_prefix
from serve._proxy_flags import controller_flags, secret_env
from serve._rpc.controller_client import lookup_application_blocking
from serve._serialization import dumps_code
from serve._settings import settings
from serve._sync import is_home_thread, run_sync, stop_io_thread
from serve._tracing import tracing_env
from serve.config import (
    AutoscalingPolicy,
    ControllerOptions,
    HTTPOptions,
    ProxyLocation,
    gRPCOptions,
)
from serve.exceptions import DeploymentFailedError, ServeError
from serve.handle import DeploymentHandle
from serve.schema import ApplicationStatusOverview, ServeStatus, TracingConfig

__all__ = [
    "delete",
    "get_app_handle",
    "get_deployment_handle",
    "RunTarget",
    "run",
    "run_many",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
]

logger = logging.getLogger("serve")

_PROGRESS_EVERY_S = 5.0
PROXY_START_TIMEOUT_S = 30.0
PROXY_READY_TIMEOUT_S = 60.0  # as Ray's HTTP_PROXY_TIMEOUT: serve.start waits this long
_MAX_CACHED_HANDLES = 100
_handles: dict[tuple[str, str], DeploymentHandle[Any]] = {}
_handles_lock = threading.Lock()
_atexit_registered = False


def _cached_handle(deployment_name: str, app_name: str) -> DeploymentHandle[Any]:
    key = (app_name, deployment_name)
    with _handles_lock:
        handle = _handles.get(key)
        if handle is None:
            if len(_handles) >= _MAX_CACHED_HANDLES:
                _handles.pop(next(iter(_handles)))
            handle = _handles[key] = DeploymentHandle(deployment_name, app_name)
        return handle


def _connect(
    address: str | None = None,
    controller_args: list[str] | None = None,
    controller_env: dict[str, str] | None = None,
) -> ServeClient:
    client = _client.connect(
        address, controller_args=controller_args, controller_env=controller_env
    )
    if client.owner is not None:
        _shutdown_at_exit_once()
    return client


def _shutdown_at_exit_once() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_shutdown_at_exit)


def start(
    address: str | None = None,
    *,
    proxy_location: ProxyLocation | str | None = None,
    http_options: HTTPOptions | dict[str, Any] | None = None,
    grpc_options: gRPCOptions | dict[str, Any] | None = None,
    logging_config: Any = None,
    controller_options: ControllerOptions | dict[str, Any] | None = None,
    tracing_config: TracingConfig | dict[str, Any] | None = None,
    **_ray_options: Any,
) -> None:
    """Connect to serve: the controller at ``address`` (or SERVE_ADDRESS), else an embedded one
    started with these proxy options (Ray's: HTTP on 127.0.0.1:8000, gRPC on 9000 when
    ``grpc_servicer_functions`` are given, a proxy on every node).

    ``logging_config`` sets the log level and encoding of the controller and proxy (and of
    replicas whose deployment sets none); ``controller_options.runtime_env["env_vars"]`` are
    set in the controller's environment (its replicas inherit them). ``tracing_config``
    turns on OpenTelemetry tracing in the proxies and replicas (see ``TracingConfig``); its
    exporter is imported here first, so a wrong path fails now. Other Ray cluster options
    (``detached``, ``dedicated_cpu`` ...) are accepted and ignored.

    As Ray's, it returns once every proxy is serving (``TimeoutError`` after
    ``PROXY_READY_TIMEOUT_S``, naming why a proxy is not).
    """
    given = (proxy_location, http_options, grpc_options) != (None, None, None)
    flags = controller_flags(proxy_location, http_options, grpc_options) if given else None
    env = {
        **(controller_env(logging_config, controller_options, tracing_config) or {}),
        **secret_env(http_options),
    }
    client = _connect(address, controller_args=flags, controller_env=env or None)
    run_sync(_wait_proxies_serving(client, PROXY_READY_TIMEOUT_S))


async def _wait_proxies_serving(client: ServeClient, timeout_s: float) -> None:
    """Until every proxy is HEALTHY (none: at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        proxies = (await client.controller.status()).proxy_details
        if all(p.status == "HEALTHY" for p in proxies.values()):
            return
        if time.monotonic() > deadline:
            reasons = "; ".join(
                f"{node}: {p.status}{f' ({p.message})' if p.message else ''}"
                for node, p in sorted(proxies.items())
                if p.status != "HEALTHY"
            )
            raise TimeoutError(f"HTTP proxies not available after {timeout_s:g}s: {reasons}.")
        await asyncio.sleep(0.05)


def controller_env(
    logging_config: Any, controller_options: Any, tracing_config: Any = None
) -> dict[str, str] | None:
    """The environment an embedded controller gets for serve.start's logging_config,
    controller_options and tracing_config (None when none is given)."""
    env = dict(ControllerOptions.from_value(controller_options).env_vars)
    logging = check_logging_config(logging_config)
    if logging:
        env["SERVE_LOG_LEVEL"] = str(logging.get("log_level", "INFO"))
        env["SERVE_LOG_FORMAT"] = "json" if logging.get("encoding") == "JSON" else "text"
    if tracing_config is not None:
        env.update(tracing_env(TracingConfig.from_value(tracing_config)))
    return env or None


def _serialize(built: BuiltDeployment, stable_version: bool) -> DeploymentSpec:
    name = built.name
    try:
        code = dumps_code(built.deployment.func_or_class)
    except Exception as exc:
        raise TypeError(f"Could not serialize the code of deployment {name!r}: {exc}") from exc
    try:
        init = dumps_code((built.init_args, built.init_kwargs))
    except ServeError:
        raise
    except Exception as exc:
        raise TypeError(
            f"Could not serialize the constructor arguments of deployment {name!r}: {exc}"
        ) from exc
    # ray_actor_options (resources, runtime_env) change the process, so they are in the version.
    # So does max_replicas_per_node (placement), when set.
    config = built.deployment.config
    placement: dict[str, Any] = dict(config.ray_actor_options or {})
    if config.max_replicas_per_node is not None:
        placement["max_replicas_per_node"] = config.max_replicas_per_node
    if config.gang_scheduling_config is not None:
        placement["gang_scheduling_config"] = config.gang_scheduling_config
    actor_options = orjson.dumps(placement, option=orjson.OPT_SORT_KEYS)
    # The code version decides whether running replicas are kept (only config options changed)
    # or replaced. Declarative deploys (config files) derive it from the code, so an unchanged
    # application keeps its replicas; serve.run without a `version` always replaces them, as
    # in Ray.
    version = built.deployment.version
    if not version:
        if stable_version:
            version = hashlib.sha256(code + init + actor_options).hexdigest()[:16]
        else:
            version = secrets.token_hex(8)
    return DeploymentSpec(
        name=name,
        serialized_callable=code,
        serialized_init_args=init,
        code_version=version,
        config=built.deployment.config,
    )


def run(
    target: Application,
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = "/",
    logging_config: Any = None,
    _local_testing_mode: bool = False,
    external_scaler_enabled: bool = False,
    controller_options: ControllerOptions | dict[str, Any] | None = None,
) -> DeploymentHandle[Any]:
    """Deploy an application, wait until every replica runs, return its ingress handle.

    Re-running a name updates that application: its replicas are replaced by new ones (a
    rolling update), as in Ray. A deployment given a ``version`` keeps its replicas while the
    version stays the same: a change of ``user_config`` alone then calls ``reconfigure`` on the
    live replicas, and ``num_replicas`` changes scale them. Raises ``DeploymentFailedError`` (a
    ``RuntimeError``) with the replica's traceback if a constructor keeps failing.

    Example::

        handle = serve.run(Ingress.bind(Downstream.bind()), name="hello")
        assert handle.remote("world").result() == "Hello world!"
    """
    targets = [RunTarget(target, name, route_prefix, logging_config, external_scaler_enabled)]
    if controller_options is not None and not _local_testing_mode:
        _connect(controller_env=controller_env(None, controller_options))
    return run_many(targets, blocking=blocking, _local_testing_mode=_local_testing_mode)[0]


@dataclasses.dataclass(frozen=True)
class RunTarget:
    """One application for :func:`run_many`: what :func:`run` takes besides ``blocking``."""

    target: Application
    name: str = "default"
    route_prefix: str | None = "/"
    logging_config: Any = None
    external_scaler_enabled: bool = False


def run_many(
    targets: Sequence[RunTarget],
    blocking: bool = False,
    wait_for_ingress_deployment_creation: bool = True,
    wait_for_applications_running: bool = True,
    _local_testing_mode: bool = False,
) -> list[DeploymentHandle[Any]]:
    """Deploy several applications at once; returns their ingress handles, in order.

    Every application is sent before any is waited for, so they start side by side. With
    ``wait_for_applications_running=False`` it returns once the controller has them.

    Example::

        serve.run_many([
            serve.RunTarget(A.bind(), name="a", route_prefix="/a"),
            serve.RunTarget(B.bind(), name="b", route_prefix="/b"),
        ])
    """
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"run_many got the same application name twice: {names}.")
    for t in targets:
        check_route_prefix(t.route_prefix)
    if _local_testing_mode:
        return [_run_local(t.target, t.name) for t in targets]
    built = [
        build_specs(t.target, t.name, logging_config=t.logging_config, stable_versions=False)
        for t in targets
    ]
    handles = [
        _cached_handle(ingress, t.name) for t, (ingress, _) in zip(targets, built, strict=True)
    ]
    try:
        client = _connect()
        env = code_env()
        for t, (ingress, specs) in zip(targets, built, strict=True):
            run_sync(
                client.controller.deploy(
                    app_name=t.name,
                    route_prefix=t.route_prefix,
                    ingress=ingress,
                    specs=specs,
                    code_env=env,
                )
            )
        if wait_for_applications_running:
            for t, handle in zip(targets, handles, strict=True):
                version = run_sync(_wait_settled(client, t.name))
                run_sync(_wait_router_ready(client, handle.deployment_id, version))
                if t.route_prefix is not None:
                    for url in run_sync(served_urls(client, t.route_prefix)):
                        _driver_log().info("Application %r is ready at %s.", t.name, url)
        if blocking:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        if not blocking:
            raise
        # Ctrl-C at any moment of a blocking run (deploying included) stops serve cleanly.
        logger.info("Got KeyboardInterrupt, shutting serve down")
        shutdown()
    return handles


async def served_urls(
    client: ServeClient, route_prefix: str, timeout_s: float = PROXY_START_TIMEOUT_S
) -> list[str]:
    """Where the proxies serve ``route_prefix`` over HTTP (none when proxies are disabled),
    once none is still starting (bounded), so the URL answers when serve.run returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await client.controller.status()
        starting = any(p.status == "STARTING" for p in status.proxy_details.values())
        if not starting or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return [
        f"{'https' if proxy.https else 'http'}://{proxy.http_address}{route_prefix}"
        for proxy in status.proxy_details.values()
        if proxy.http_address
    ]


def _driver_log() -> logging.Logger:
    """The ``serve`` logger, shown on the driver's stderr at SERVE_LOG_LEVEL (as Ray shows its
    serve logs in the driver) unless the program configured logging itself."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s serve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(settings().log_level)
    return logger


_local_beside: LocalClient | None = None  # local testing mode next to a real controller


def _run_local(target: Application, name: str) -> DeploymentHandle[Any]:
    """Every deployment in this process, for unit tests (see serve/_local.py).

    In a process already connected to a controller (as Ray allows), the local deployments
    live beside it: their handles route to them, every other handle to the controller's.
    """
    global _local_beside
    client = _client.current()
    if client is None:
        client = LocalClient()
        _client.install(client)
        _shutdown_at_exit_once()
    if isinstance(client, LocalClient):
        ingress, built = build_application(target, name, make_handle=DeploymentHandle)
        with _handles_lock:  # handles of an earlier run of this name routed to the old ones
            for key in [k for k in _handles if k[0] == name]:
                del _handles[key]
        client.deploy(name, ingress, built)
        return _cached_handle(ingress, name)
    if _local_beside is None:
        _local_beside = LocalClient()
    beside = _local_beside

    def make_handle(deployment_name: str, app_name: str) -> DeploymentHandle[Any]:
        return beside.bind(DeploymentHandle(deployment_name, app_name))

    ingress, built = build_application(target, name, make_handle=make_handle)
    beside.deploy(name, ingress, built)
    return make_handle(ingress, name)


def build_specs(
    target: Application,
    name: str,
    *,
    logging_config: Any = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    stable_versions: bool = True,
) -> tuple[str, list[DeploymentSpec]]:
    """Build and serialize an application: (ingress name, one spec per deployment).

    ``overrides`` (deployment name -> options, from a config file) win over the code's options;
    ``logging_config`` is the default of deployments that have none. ``stable_versions``:
    deployments without a ``version`` get one derived from their code (else a new one).
    """
    if not isinstance(name, str) or not name or "#" in name:
        raise ValueError(f"Application name must be a non-empty string without '#', got {name!r}.")
    ingress, built = build_application(target, name, make_handle=DeploymentHandle)
    unknown = sorted(set(overrides or {}) - {b.name for b in built})
    if unknown:
        raise ValueError(
            f"Application {name!r} has no deployment(s) {unknown}; it has "
            f"{sorted(b.name for b in built)}."
        )
    if logging_config is not None:
        logging_config = check_logging_config(logging_config)
    adjusted = []
    for b in built:
        deployment = b.deployment
        if logging_config is not None and deployment.config.logging_config is None:
            deployment = deployment.options(logging_config=logging_config)
        if overrides and b.name in overrides:
            deployment = deployment.options(**overrides[b.name])
        adjusted.append(dataclasses.replace(b, deployment=deployment))
    return ingress, [_serialize(b, stable_versions) for b in adjusted]


def code_env() -> CodeEnv:
    """This process's working directory and import path, for replicas to mirror."""
    cwd = os.getcwd()
    return CodeEnv(cwd=cwd, sys_path=tuple(p or cwd for p in sys.path))


Progress = Callable[[ApplicationStatusOverview, float], None]


async def _deploy(
    client: ServeClient,
    name: str,
    route_prefix: str | None,
    ingress: str,
    specs: list[DeploymentSpec],
    code_env: CodeEnv,
    progress: Progress | None = None,
    autoscaling_policy: AutoscalingPolicy | None = None,
) -> int:
    """Deploy and wait until the application runs; returns the ingress replica-set version."""
    await client.controller.deploy(
        app_name=name,
        route_prefix=route_prefix,
        ingress=ingress,
        specs=specs,
        code_env=code_env,
        autoscaling_policy=autoscaling_policy,
    )
    return await _wait_settled(client, name, progress=progress)


async def _wait_settled(client: ServeClient, name: str, progress: Progress | None = None) -> int:
    """Wait until the application runs (or raise why it does not)."""
    controller = client.controller
    started = time.monotonic()
    while True:
        waited = await controller.wait_application(
            name, timeout_s=1.0 if progress else _PROGRESS_EVERY_S
        )
        if waited is None:
            raise DeploymentFailedError(f"Application {name!r} was deleted while it deployed.")
        status, version = waited
        elapsed_s = time.monotonic() - started
        if progress is not None:
            progress(status, elapsed_s)
        if status.status == ApplicationStatus.RUNNING:
            return version
        if status.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            error = DeploymentFailedError(
                f"Deploying application {name!r} failed: {status.message}"
            )
            cause = await controller.failure_cause(name)
            raise error from cause
        if progress is None:
            waiting = {
                d: dict(s.replica_states)
                for d, s in status.deployments.items()
                if s.status != "HEALTHY"
            }
            logger.info(
                "Application %r is still deploying after %.0fs: %s", name, elapsed_s, waiting
            )


async def _wait_router_ready(
    client: ServeClient, deployment_id: DeploymentID, version: int
) -> None:
    """Let the handle learn the replica set the deploy produced before the first request.

    Without this, a request sent right after ``serve.run`` could still go to a replica of the
    previous version that is about to drain.
    """
    await client.deployment_state(deployment_id).wait_version(version)


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas drain in-flight requests and stop."""
    client = _client.current() or _connect()
    if isinstance(client, LocalClient):
        client.delete(name)
        return
    run_sync(client.controller.delete_application(name, wait=_blocking))


def status() -> ServeStatus:
    """Every application's status, its deployments' statuses and replica counts by state."""
    client = _client.current()
    if client is None:
        try:
            client = _client.connect(start_embedded=False)
        except ServeError:
            return ServeStatus()
    if isinstance(client, LocalClient):
        return client.status()
    return run_sync(client.controller.status())


def get_app_handle(name: str) -> DeploymentHandle[Any]:
    """The handle of an application's ingress deployment (cached: the same object each call)."""
    client = _client.current() or _client.connect(start_embedded=False)
    ingress, _ = _lookup(client, name)
    return _cached_handle(ingress, name)


def get_deployment_handle(
    deployment_name: str, app_name: str | None = None
) -> DeploymentHandle[Any]:
    """A handle to one deployment; inside a replica ``app_name`` defaults to its own app."""
    if app_name is None:
        context = replica_context()
        if context is None:
            raise ServeError(
                "get_deployment_handle() needs app_name outside a deployment; pass "
                "app_name=... (the name given to serve.run)."
            )
        app_name = context.app_name
    client = _client.current() or _client.connect(start_embedded=False)
    if replica_context() is None:
        _, deployments = _lookup(client, app_name)
        if deployment_name not in deployments:
            raise ServeError(
                f"Deployment '{deployment_name}' does not exist in application '{app_name}'; "
                f"it has {sorted(deployments)}."
            )
    return _cached_handle(deployment_name, app_name)


def _lookup(client: ServeClient, app_name: str) -> tuple[str, list[str]]:
    """The application's (ingress, deployment names); ServeError if it does not exist."""
    if isinstance(client, LocalClient):
        found = client.application(app_name)
    elif is_home_thread():  # inside a replica's event loop: a short blocking lookup
        found = lookup_application_blocking(client, app_name)
    else:
        found = run_sync(client.controller.get_application(app_name))
    if found is None:
        raise ServeError(f"Application '{app_name}' does not exist.")
    return found


def shutdown() -> None:
    """Delete every application and stop serve (an embedded controller exits with its replicas)."""
    client = _client.current()
    if client is None:
        _close_local_beside()
        return
    owner = client.owner
    try:
        if not isinstance(client, LocalClient):
            run_sync(client.controller.shutdown(), timeout_s=300)
    except ServeError as exc:
        logger.warning("Shutting serve down: %s", exc)
    finally:
        _client.disconnect()
        _close_local_beside()
        with _handles_lock:
            _handles.clear()
        if owner is not None:
            owner.stop(timeout_s=30)


def _close_local_beside() -> None:
    global _local_beside
    beside, _local_beside = _local_beside, None
    if beside is not None:
        for name in list(beside.apps):
            beside.delete(name)


async def shutdown_async() -> None:
    """Async form of :func:`shutdown`."""
    import asyncio

    await asyncio.to_thread(shutdown)


def _shutdown_at_exit() -> None:
    client = _client.current()
    if client is not None and (client.owner is not None or isinstance(client, LocalClient)):
        try:
            shutdown()
        except Exception:
            logger.exception("Stopping the embedded serve controller at exit failed")
    stop_io_thread()
