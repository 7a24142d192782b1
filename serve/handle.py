"""DeploymentHandle and the responses it returns: thin facades over ``serve._router``.

Example::

    handle: DeploymentHandle = serve.run(app)
    assert handle.remote("world").result() == "Hello world!"        # from sync code
    assert await handle.say_hi.remote("world") == "Hello world!"   # from any event loop
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, Generic, TypeVar

from serve import _client
from serve._broadcast import gather_async, gather_sync, start_broadcast
from serve._models import DeploymentID, ReplicaID
from serve._options import DEFAULT, HandleOptions, validate_handle_options
from serve._request import InputWindow, Request, RequestState, Reservation, ResponseBase
from serve._router import Router
from serve._settings import settings
from serve._sync import SYNC_IN_LOOP_MESSAGE, Completion, in_running_loop, post
from serve.exceptions import BackPressureError, RequestTimeoutError, ServeError

__all__ = [
    "DeploymentBroadcastResponse",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "ReplicaSelection",
]

T = TypeVar("T")
R = TypeVar("R")

_UNSET: Any = DEFAULT.VALUE
CREDIT_EVERY = 32  # stream items consumed before the replica is told it may send more

_NOT_SERIALIZABLE = (
    "`DeploymentResponse` is not serializable. If you are passing the `DeploymentResponse` in "
    "a nested object (e.g. a list or dictionary) to a downstream deployment handle call, that "
    "is no longer supported. Please only pass `DeploymentResponse` objects as top level "
    "arguments."
)


class _HandleCore:
    """What a handle shares with its ``options()`` copies: identity and router."""

    __slots__ = ("handle_id", "lock", "prefer_local_routing", "router", "used")

    def __init__(self) -> None:
        self.handle_id = os.urandom(6).hex()
        self.lock = threading.Lock()
        self.router: Router | None = None
        self.prefer_local_routing = False
        self.used = False


class DeploymentHandle(Generic[T]):
    """A handle used to make requests to a deployment at runtime.

    Get one from ``serve.run``, ``serve.get_app_handle``, ``serve.get_deployment_handle``, or by
    binding one application into another's constructor. Handles are safe to use from many
    threads and event loops at once, and can be pickled into requests.

    Example::

        handle.remote("world").result()                      # call __call__
        await handle.other_method.remote()                   # call another method
        handle.options(multiplexed_model_id="m1").remote()   # per-call options
    """

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        _options: HandleOptions | None = None,
        _core: _HandleCore | None = None,
    ) -> None:
        self.deployment_id = DeploymentID(deployment_name, app_name)
        self.handle_options = _options if _options is not None else HandleOptions()
        self._core = _core if _core is not None else _HandleCore()

    @property
    def deployment_name(self) -> str:
        return self.deployment_id.name

    @property
    def app_name(self) -> str:
        return self.deployment_id.app_name

    @property
    def handle_id(self) -> str:
        return self._core.handle_id

    @property
    def is_initialized(self) -> bool:
        return self._core.router is not None

    @property
    def _router(self) -> Router:
        router = self._core.router
        if router is None:
            with self._core.lock:
                router = self._core.router
                if router is None:
                    client = _client.current() or _client.connect(start_embedded=False)
                    router = Router(client, self.deployment_id)
                    router.prefer_local_routing = self._core.prefer_local_routing
                    self._core.router = router
        return router

    def running_replicas_populated(self) -> bool:
        router = self._core.router
        return router is not None and router.running_replicas_populated()

    def _init(self, *, _prefer_local_routing: bool = False, **_: Any) -> None:
        """Initialize the router with init-only options (before any use)."""
        with self._core.lock:
            if self._core.router is not None or self._core.used:
                raise RuntimeError(
                    "Handle already initialized: _init() must be called once, before options() "
                    "or any request."
                )
            self._core.prefer_local_routing = _prefer_local_routing
        self._router  # noqa: B018 - creates the router now

    def options(
        self,
        *,
        method_name: Any = _UNSET,
        multiplexed_model_id: Any = _UNSET,
        stream: Any = _UNSET,
        use_new_handle_api: Any = _UNSET,
        _prefer_local_routing: Any = _UNSET,
        _by_reference: Any = _UNSET,
        request_serialization: Any = _UNSET,
        response_serialization: Any = _UNSET,
    ) -> DeploymentHandle[T]:
        """A copy of this handle with per-call options changed; the original is unchanged."""
        changes = validate_handle_options(
            method_name=method_name,
            multiplexed_model_id=multiplexed_model_id,
            stream=stream,
            use_new_handle_api=use_new_handle_api,
            prefer_local_routing=_prefer_local_routing,
            by_reference=_by_reference,
            request_serialization=request_serialization,
            response_serialization=response_serialization,
        )
        self._core.used = True
        return DeploymentHandle(
            self.deployment_name,
            self.app_name,
            _options=self.handle_options.copy_and_update(**changes),
            _core=self._core,
        )

    def __getattr__(self, name: str) -> DeploymentHandle[T]:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Call the deployment; returns at once with a response (the request runs eagerly).

        Returns a ``DeploymentResponse``, or a ``DeploymentResponseGenerator`` with
        ``options(stream=True)``. ``DeploymentResponse`` arguments (top level only) are resolved
        before the request is sent. A call made while serving a request that has a deadline (an
        ingress request's timeout) inherits it: past it, the response raises
        ``RequestTimeoutError``.
        """
        router = self._router
        try:
            request = router.make_request(self.handle_options, args, kwargs)
        except (BackPressureError, RequestTimeoutError) as exc:
            # As in Ray, the response raises it when awaited (or on result()).
            request = router.refused_request(self.handle_options, exc)
        else:
            post(router.submit, request)
        if request.stream:
            return DeploymentResponseGenerator(request, router)
        return DeploymentResponse(request, router)

    @contextlib.asynccontextmanager
    async def choose_replica(self, *args: Any, **kwargs: Any) -> AsyncIterator[ReplicaSelection]:
        """Choose a replica for one request without sending it yet (developer API, as Ray).

        Routes as ``remote()`` does (power of two choices, queueing, backpressure) and holds a
        slot on the chosen replica, so that :meth:`dispatch` inside the block is never
        rejected. Leaving the block without dispatching gives the slot back. The arguments are
        accepted for Ray's signature; routing here does not depend on them.

        Example::

            async with handle.choose_replica(prompt) as selection:
                print(selection.replica_id, selection.node_ip)
                result = await handle.dispatch(selection, prompt)
        """
        router = self._router
        options = self.handle_options
        if options.stream:
            options = options.copy_and_update(stream=False)
        request = router.make_request(options, (), {})
        request.reserve_only = True
        post(router.submit, request)
        try:
            reservation: Reservation = await request.completion.wait()
        except asyncio.CancelledError:
            post(router.drop_reservation, request)
            raise
        selection = ReplicaSelection(self.deployment_id, reservation)
        try:
            yield selection
        finally:
            if selection._state == _HELD:
                selection._state = _RELEASED
                post(router.release, reservation)

    def dispatch(self, selection: ReplicaSelection, *args: Any, **kwargs: Any) -> Any:
        """Send a request to the replica ``selection`` holds a slot on (see
        :meth:`choose_replica`); returns what ``remote()`` would. Once per selection.

        The response raises ``ReplicaUnavailableError`` if that replica is gone by then.
        """
        if not isinstance(selection, ReplicaSelection):
            raise TypeError(
                f"dispatch() takes the ReplicaSelection that choose_replica() yielded, not "
                f"{type(selection).__name__}."
            )
        if selection._deployment_id != self.deployment_id:
            raise ValueError(
                "Cannot dispatch a selection created for a different deployment. This handle "
                f"is for {self.deployment_id}, but the selection was created for "
                f"{selection._deployment_id}."
            )
        if selection._state != _HELD:
            raise RuntimeError(
                "This replica selection was already dispatched, or its choose_replica() block "
                "has ended; choose a replica again for another request."
            )
        selection._state = _DISPATCHED
        router = self._router
        try:
            request = router.make_request(self.handle_options, args, kwargs, queued=False)
        except BaseException:
            post(router.release, selection._reservation)
            raise
        request.attempt = selection._reservation  # its one attempt: in the held slot
        post(router.submit, request)
        if request.stream:
            return DeploymentResponseGenerator(request, router)
        return DeploymentResponse(request, router)

    def broadcast(self, method_name: str, *args: Any, **kwargs: Any) -> DeploymentBroadcastResponse:
        """Call ``method_name`` once on every replica running now; no load balancing.

        Ignores ``stream=True``. Meant for rare control operations (cache resets, reloads).
        """
        router = self._router
        options = self.handle_options.copy_and_update(method_name=method_name, stream=False)
        return DeploymentBroadcastResponse(start_broadcast(router, options, args, kwargs))

    def shutdown(self) -> None:
        """Release this handle's resources (a no-op: routers are shared by the process)."""

    async def shutdown_async(self) -> None:
        """Async form of :meth:`shutdown`."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handle, (self.deployment_name, self.app_name, self.handle_options))

    def __repr__(self) -> str:
        return (
            f"DeploymentHandle(deployment={self.deployment_name!r}, app={self.app_name!r}, "
            f"method={self.handle_options.method_name!r})"
        )


_HELD, _DISPATCHED, _RELEASED = 0, 1, 2


class ReplicaSelection:
    """The replica ``DeploymentHandle.choose_replica()`` chose, holding a slot for one request.

    ``replica_id`` is the replica's unique id (``get_replica_context().replica_id.unique_id``
    inside it, as in Ray); ``node_id``, ``node_ip`` and ``port`` say where it runs.
    """

    __slots__ = (
        "_deployment_id",
        "_reservation",
        "_state",
        "availability_zone",
        "node_id",
        "node_ip",
        "port",
        "replica_id",
    )

    def __init__(self, deployment_id: DeploymentID, reservation: Reservation) -> None:
        replica = reservation.replica
        self._deployment_id = deployment_id
        self._reservation = reservation
        self._state = _HELD
        self.replica_id = ReplicaID.parse(replica.replica_id).unique_id
        host, _, port = replica.address.rpartition(":")
        self.node_ip = host.strip("[]")
        self.port = int(port) if port.isdigit() else 0
        self.node_id = replica.host or self.node_ip
        self.availability_zone: str | None = None

    def __repr__(self) -> str:
        return f"ReplicaSelection(replica_id={self.replica_id!r}, node_ip={self.node_ip!r})"


def _rebuild_handle(name: str, app: str, options: HandleOptions) -> DeploymentHandle[Any]:
    return DeploymentHandle(name, app, _options=options)


class _ResponseFacade(ResponseBase):
    __slots__ = ("_router",)
    # Read by the msgpack and orjson codecs, which never call __reduce__.
    __serve_unserializable__ = _NOT_SERIALIZABLE

    def __init__(self, request: Request, router: Router) -> None:
        super().__init__(request)
        self._router = router

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def cancel(self) -> None:
        """Cancel the request (best effort, idempotent); waiters get RequestCancelledError."""
        request = self._request
        if not request.cancelled:
            request.cancelled = True
            post(request.cancel)

    def cancelled(self) -> bool:
        return self._request.cancelled

    def __reduce__(self) -> tuple[Any, ...]:
        raise ServeError(_NOT_SERIALIZABLE)

    def _to_object_ref_sync(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "Converting DeploymentResponses to Ray ObjectRefs is not supported: there is no Ray "
            "object store here. Await the response (or call .result()) instead."
        )

    async def _to_object_ref(self, *args: Any, **kwargs: Any) -> Any:
        self._to_object_ref_sync()


class DeploymentResponse(_ResponseFacade, Generic[R]):
    """The future result of a unary ``handle.remote()`` call.

    Await it from any event loop, or call ``result()`` from sync code; both may be repeated.
    Pass it (top level) to another ``.remote()`` call to compose deployments.
    """

    __slots__ = ()

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> R:
        """Block until the result is ready; ``TimeoutError`` leaves the request running."""
        if not _skip_asyncio_check and in_running_loop():
            raise RuntimeError(SYNC_IN_LOOP_MESSAGE)
        return self._request.completion.wait_sync(timeout_s)  # type: ignore[no-any-return]

    def __await__(self) -> Generator[Any, None, R]:
        return self._request.completion.wait().__await__()

    def __repr__(self) -> str:
        return f"DeploymentResponse(request_id={self.request_id!r})"


class DeploymentResponseGenerator(_ResponseFacade, Generic[R]):
    """The items of a streaming call (``handle.options(stream=True).remote()``).

    Iterate with ``for`` in sync code or ``async for`` on any event loop. Items arrive as the
    replica yields them; an exception raised mid-stream comes after the items before it.
    """

    __slots__ = (
        "_consumed",
        "_consumed_bytes",
        "_credit_bytes_every",
        "_credit_every",
        "_detached",
    )

    def __init__(self, request: Request, router: Router) -> None:
        super().__init__(request, router)
        self._consumed = 0
        self._consumed_bytes = 0
        envelope = request.envelope
        self._credit_every = min(max(envelope.stream_window // 2, 1), CREDIT_EVERY)
        self._credit_bytes_every = max(envelope.stream_window_bytes // 4, 1)
        self._detached = False

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError(
            "`DeploymentResponseGenerator` cannot be awaited directly. Use `async for` or "
            "`await response.__anext__()` instead."
        )

    def _taken(self, item: tuple[memoryview, list[bytes] | None]) -> None:
        body, buffers = item
        self._consumed += 1
        self._consumed_bytes += len(body) + sum(len(b) for b in buffers or ())
        if self._consumed >= self._credit_every or self._consumed_bytes >= self._credit_bytes_every:
            count, nbytes = self._consumed, self._consumed_bytes
            self._consumed = self._consumed_bytes = 0
            post(self._router.credit, self._request, count, nbytes)

    def __iter__(self) -> Iterator[R]:
        return self

    def __next__(self) -> R:
        if in_running_loop():
            raise RuntimeError(SYNC_IN_LOOP_MESSAGE)
        buffer = self._request.stream_buffer
        assert buffer is not None
        found, body = buffer.get_sync()
        if not found:
            raise StopIteration
        self._taken(body)
        return self._router.decode_item(self._request, body)  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[R]:
        return self

    async def __anext__(self) -> R:
        buffer = self._request.stream_buffer
        assert buffer is not None
        found, body = await buffer.get()
        if not found:
            raise StopAsyncIteration
        self._taken(body)
        return self._router.decode_item(self._request, body)  # type: ignore[no-any-return]

    def _feed(self, payload: bytes) -> None:
        """Send one more input to the running request (the proxy's ASGI receive messages).
        Home loop; call :meth:`_input_room` first to keep within the ingress window."""
        request = self._request
        window = request.window
        if window is None:
            s = settings()
            window = request.window = InputWindow(s.ingress_window_bytes, s.websocket_max_queue)
        window.sent(len(payload))
        self._router.feed(request, payload)

    def _input_full(self) -> bool:
        """Whether the inputs fed and not yet read by the replica fill the ingress window."""
        window = self._request.window
        return window is not None and window.full()

    async def _input_room(self) -> None:
        """Until the replica has read enough of the fed inputs for one more (home loop)."""
        window = self._request.window
        if window is not None:
            await window.room()

    def _detach(self) -> None:
        """Stop reading without cancelling: the request finishes on its own (the proxy, once
        an HTTP response is complete, leaves the rest of the call to run)."""
        self._detached = True

    def __del__(self) -> None:
        # A consumer that drops the stream cancels it, so the replica stops producing.
        request = self._request
        if not self._detached and not request.cancelled and request.state != RequestState.DONE:
            request.cancelled = True
            try:
                post(request.cancel)
            except Exception:  # interpreter shutdown: nothing left to cancel
                pass

    def __repr__(self) -> str:
        return f"DeploymentResponseGenerator(request_id={self.request_id!r})"


class DeploymentBroadcastResponse:
    """The results of ``handle.broadcast()``: one per replica that was called."""

    def __init__(self, calls: Completion) -> None:
        self._calls = calls

    def results(
        self, *, timeout_s: float | None = None, return_exceptions: bool = False
    ) -> list[Any]:
        """Block for every replica's result (order not guaranteed).

        A replica's exception is raised, or returned in the list with ``return_exceptions``.
        ``TimeoutError`` if not all are done within ``timeout_s``.
        """
        if in_running_loop():
            raise RuntimeError(
                "Sync methods should not be called from within an `asyncio` event loop. "
                "Use `await response.results_async()` instead."
            )
        return gather_sync(self._calls, timeout_s, return_exceptions)

    async def results_async(
        self, *, timeout_s: float | None = None, return_exceptions: bool = False
    ) -> list[Any]:
        """Await every replica's result; see :meth:`results`."""
        return await gather_async(self._calls, timeout_s, return_exceptions)
