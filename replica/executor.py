"""Hosts the user object: builds it, finds methods, runs requests, counts them.

Async methods run on the replica's loop; sync methods run in a thread pool so they never block
the server. Admission is atomic (this runs on one loop): a request is admitted only while
``ongoing < max_ongoing_requests`` and counts until its user code has really finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from replica.class_routes import bind_class_routes
from replica.grpc_methods import serve_grpc_call
from replica.ingress import Lifespan, answer_serve_errors, call_app, serve_asgi
from replica.loader import apply_code_env, apply_runtime_env, load_callable, load_init_args
from replica.workers import SyncWorkers
from serve._context import (
    ReplicaContext,
    RequestContext,
    current_request,
    set_current_deadline,
    set_current_request,
    set_replica_context,
)
from serve._ingress import ASGI_METHOD, GRPC_METHOD, GrpcCall, asgi_app_of
from serve._metrics import RequestStats
from serve._models import CodeEnv, DeploymentConfig, DeploymentSpec, ReplicaID
from serve._multiplex import registry as multiplex_registry
from serve._settings import settings
from serve._user_methods import build_target, maybe_await, user_method
from serve.exceptions import ServeError
from serve.schema import ReplicaRank

logger = logging.getLogger(__name__)

Kind = Literal["async", "sync", "asyncgen", "gen"]
MAX_SYNC_THREADS = 64


def _has_parameters(target: Callable[..., Any]) -> bool:
    try:
        return bool(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # no signature to read: pass what there is
        return True


def _kind(target: Callable[..., Any]) -> Kind:
    probe = target
    if not (inspect.isfunction(probe) or inspect.ismethod(probe) or inspect.isclass(probe)):
        probe = inspect.getattr_static(type(target), "__call__", target)  # a callable object
    if inspect.isasyncgenfunction(probe):
        return "asyncgen"
    if inspect.isgeneratorfunction(probe):
        return "gen"
    if inspect.iscoroutinefunction(probe):
        return "async"
    return "sync"


class Executor:
    """The user's deployment inside this replica."""

    def __init__(self, replica_id: ReplicaID) -> None:
        self.replica_id = replica_id
        self.app_name = replica_id.deployment_id.app_name
        self.deployment = replica_id.deployment_id.name
        self.config = DeploymentConfig()
        self.code_version = ""
        self.user_config_json: bytes | None = None
        self.max_ongoing = self.config.max_ongoing_requests
        self.ongoing = 0
        self.stats = RequestStats()
        self.access_log = True
        self.draining = False
        self.initialized = False
        self._target: Any = None
        self._is_function = False
        self._methods: dict[str, tuple[Callable[..., Any], Kind]] = {}
        self._workers: SyncWorkers | None = None
        self._asgi: Any = None  # the ASGI app HTTP requests run (built on first use)
        self._lifespan: Lifespan | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._slot_freed = asyncio.Event()
        self.rank: ReplicaRank | None = None

    # Lifecycle.

    async def initialize(
        self, spec: DeploymentSpec, code_env: CodeEnv, rank: int = -1, world_size: int = 0
    ) -> None:
        """Build the user object; raises what the user's constructor raises."""
        apply_code_env(code_env)
        actor_options = spec.config.ray_actor_options or {}
        apply_runtime_env(actor_options.get("runtime_env"))
        self.config = spec.config
        self.max_ongoing = spec.config.max_ongoing_requests
        self.code_version = spec.code_version
        target = load_callable(spec.serialized_callable)
        args, kwargs = load_init_args(spec.serialized_init_args)
        self.rank = ReplicaRank(rank) if rank >= 0 else None
        context = ReplicaContext(
            app_name=self.app_name,
            deployment=self.deployment,
            replica_tag=self.replica_id.unique_id,
            replica_id=self.replica_id,
            rank=self.rank,
            world_size=world_size or None,
            node_id=settings().node_id,
        )
        set_replica_context(context)
        self._target, self._is_function = await build_target(target, args, kwargs)
        set_replica_context(dataclasses.replace(context, servable_object=self._target))
        app = None if self._is_function else asgi_app_of(self._target)
        if app is not None:  # @serve.ingress: its routes, then its lifespan startup, as Ray
            if inspect.isfunction(app):
                app = app()
            self._asgi = bind_class_routes(app, self._target)
            answer_serve_errors(self._asgi)
            self._lifespan = Lifespan(self._asgi)
            await self._lifespan.startup()
        user_config = spec.config.user_config_json()
        if user_config is not None or self._takes_rank():
            await self._call_reconfigure(spec.config.user_config)
        self.user_config_json = user_config
        self.initialized = True

    async def reconfigure(self, config: DeploymentConfig, user_config_changed: bool) -> None:
        self.config = config
        self.max_ongoing = config.max_ongoing_requests
        if self._workers is not None:
            self._workers.resize(min(self.max_ongoing, MAX_SYNC_THREADS))
        if user_config_changed:
            await self._call_reconfigure(config.user_config)
            self.user_config_json = config.user_config_json()

    def _takes_rank(self) -> bool:
        """Whether the user's ``reconfigure`` has a ``rank`` parameter (then, as in Ray, it is
        called with the replica's rank even without a user_config)."""
        method = getattr(self._target, "reconfigure", None) if not self._is_function else None
        if method is None:
            return False
        try:
            return "rank" in inspect.signature(method).parameters
        except (TypeError, ValueError):
            return False

    async def _call_reconfigure(self, user_config: Any) -> None:
        method = getattr(self._target, "reconfigure", None) if not self._is_function else None
        if method is None:
            raise ServeError(
                f"Deployment '{self.deployment}' has a user_config but no "
                "`reconfigure(self, config)` method to receive it."
            )
        if self._takes_rank():
            await self._run_hook(method, user_config, rank=self.rank)
        else:
            await self._run_hook(method, user_config)

    def has_hook(self, name: str) -> bool:
        """Whether the user's class defines ``name`` (record_routing_stats, ...)."""
        return not self._is_function and callable(getattr(self._target, name, None))

    async def call_hook(self, name: str, timeout_s: float) -> Any:
        """Call the user's ``name()`` (sync ones on a worker thread), within ``timeout_s``."""
        method = getattr(self._target, name)
        async with asyncio.timeout(timeout_s):
            return await self._run_hook(method)

    async def check_health(self) -> None:
        method = getattr(self._target, "check_health", None) if not self._is_function else None
        if method is not None:
            await self._run_hook(method)

    async def _run_hook(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if _kind(method) == "async":
            return await method(*args, **kwargs)
        return await maybe_await(await self.run_in_thread(method, *args, **kwargs))

    async def shutdown(self) -> None:
        """Unload multiplexed models, call the user's ``__del__`` (if any), stop the pool."""
        try:
            await multiplex_registry.unload_all()
        except Exception:
            logger.exception("Unloading multiplexed models failed")
        if self._lifespan is not None:
            try:
                await self._lifespan.shutdown()
            except Exception:
                logger.exception("The ASGI app's lifespan shutdown failed")
        target, self._target = self._target, None
        if target is not None and not self._is_function:
            deleter = getattr(type(target), "__del__", None)
            if deleter is not None:
                try:
                    await self._run_hook(functools.partial(deleter, target))
                except Exception:
                    logger.exception("The deployment's __del__ raised")
        if self._workers is not None:
            self._workers.shutdown()

    # Requests.

    def admit(self) -> bool:
        if self.ongoing >= self.max_ongoing:
            return False
        self.ongoing += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        self.ongoing -= 1
        self._slot_freed.set()
        if self.ongoing <= 0:
            self.ongoing = 0
            self._idle.set()

    async def wait_admitted(self) -> None:
        """Wait for a free slot and take it (broadcast calls, which are never rejected)."""
        while not self.admit():
            self._slot_freed.clear()
            await self._slot_freed.wait()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def resolve(self, method_name: str) -> tuple[Callable[..., Any], Kind]:
        cached = self._methods.get(method_name)
        if cached is not None:
            return cached
        if self._target is None:
            raise ServeError(f"Replica {self.replica_id} is not initialized.")
        found: tuple[Callable[..., Any], Kind]
        if method_name == ASGI_METHOD:  # run by serve_asgi(), which the session calls
            found = (self.asgi_app(), "asyncgen")
        elif method_name == GRPC_METHOD:
            found = (self._serve_grpc, "asyncgen")
        else:
            target = user_method(self._target, method_name, self.deployment, self._is_function)
            found = (target, _kind(target))
        self._methods[method_name] = found
        return found

    def asgi_app(self) -> Any:
        """The app HTTP requests run: @serve.ingress's, else one around ``__call__``."""
        if self._asgi is None:
            fn, kind = self.resolve("__call__")
            # As Ray: a handler that takes no parameters is called without the request.
            takes_request = _has_parameters(fn)

            async def call(request: Any) -> Any:
                args = (request,) if takes_request else ()
                if kind == "async":
                    return await fn(*args)
                return await maybe_await(await self.run_in_thread(fn, *args))

            self._asgi = call_app(call)
        return self._asgi

    async def serve_asgi(
        self,
        args: Any,
        kwargs: dict[str, Any],
        request: RequestContext,
        emit: Callable[[Any], Awaitable[None]],
    ) -> None:
        """A connection the proxy forwarded: what the app sends goes to ``emit``."""
        set_current_request(request)
        if request.deadline_s:  # the HTTP request_timeout_s, for nested calls
            set_current_deadline(request.deadline_s)
        await serve_asgi(self.asgi_app(), *args, **kwargs, feed=request.feed, emit=emit)

    async def _serve_grpc(
        self,
        method: str,
        messages: list[bytes],
        servicer_functions: tuple[str, ...],
        call: GrpcCall | None = None,
    ) -> AsyncIterator[Any]:
        """A gRPC call the proxy forwarded (see ``replica/grpc_methods.py``)."""
        request = current_request()
        assert request is not None
        async for item in serve_grpc_call(
            self, self.deployment, method, messages, servicer_functions, call, request
        ):
            yield item

    def workers(self) -> SyncWorkers:
        if self._workers is None:
            self._workers = SyncWorkers(
                asyncio.get_running_loop(), min(self.max_ongoing, MAX_SYNC_THREADS)
            )
        return self._workers

    async def run_in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await a sync callable run on a worker thread, with the caller's context (the other
        way round from ``serve._sync.run_sync``, which blocks a thread on a coroutine)."""
        workers = self.workers()
        job = workers.start(fn, args, kwargs)
        try:
            return await job.future
        except asyncio.CancelledError:
            # A running thread cannot be interrupted: it keeps a slot until it really finishes,
            # so max_ongoing_requests still bounds the work this replica does.
            # (job.future was cancelled with this task: job.finished says if it returned.)
            if not workers.skip(job) and not job.finished:
                self.ongoing += 1
                self._idle.clear()
                job.on_finish = self.release
            raise

    async def call(
        self, method: str, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> Any:
        """Run a unary request; the caller holds an admission slot."""
        fn, kind = self.resolve(method)
        if kind in ("gen", "asyncgen"):
            raise TypeError(
                f"Method '{method}' returned a generator. You must use "
                "`handle.options(stream=True)` to call generators on a deployment."
            )
        set_current_request(request)
        if request.deadline_s:  # nested calls inherit it, in worker threads too
            set_current_deadline(request.deadline_s)
        if kind == "async":
            result = await fn(*args, **kwargs)
        else:
            result = await maybe_await(await self.run_in_thread(fn, *args, **kwargs))
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            raise TypeError(
                f"Method '{method}' returned a generator. You must use "
                "`handle.options(stream=True)` to call generators on a deployment."
            )
        return result

    def stream(
        self, method: str, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> AsyncIterator[Any]:
        """Run a streaming request, yielding its items."""
        return self._stream(method, args, kwargs, request)

    async def _stream(
        self, method: str, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> AsyncIterator[Any]:
        fn, kind = self.resolve(method)
        set_current_request(request)
        if request.deadline_s:
            set_current_deadline(request.deadline_s)
        if kind == "asyncgen":
            produced: Any = fn(*args, **kwargs)
        elif kind == "async":
            produced = await fn(*args, **kwargs)
        elif kind == "gen":
            produced = fn(*args, **kwargs)
        else:
            produced = await maybe_await(await self.run_in_thread(fn, *args, **kwargs))
        if inspect.isasyncgen(produced):
            try:
                async for item in produced:
                    yield item
            finally:
                await produced.aclose()  # a stopped stream runs the generator's finally now
        elif inspect.isgenerator(produced):
            async for item in self.workers().stream(produced):
                yield item
        else:
            raise TypeError(
                f"Called method '{method}' with `handle.options(stream=True)` but it did not "
                "return a generator; call it without stream=True (or make it yield)."
            )
