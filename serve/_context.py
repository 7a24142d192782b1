"""Who is running: the replica context (per process), the request context (per request), and
the deadline that requests made here inherit."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any, Protocol

from serve._models import ReplicaID
from serve.exceptions import ServeError
from serve.gang import GangContext
from serve.schema import ReplicaRank


class Cancellable(Protocol):
    """A request made on behalf of another one (a child), as the replica needs to see it."""

    def cancel(self) -> None: ...
    def expire(self) -> None:
        """End it with the timeout error: the deadline it inherited passed."""


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What ``serve.get_replica_context()`` returns inside a replica."""

    app_name: str
    deployment: str
    replica_tag: str
    replica_id: ReplicaID
    servable_object: Any = None
    rank: ReplicaRank | None = None
    world_size: int | None = None
    node_id: str = ""  # the node the replica runs on (SERVE_NODE_ID, else the hostname)

    @property
    def gang_context(self) -> GangContext | None:
        """This replica's gang (gang_scheduling_config), or None. It is the process's: given
        to the replica when it was launched with its gang."""
        return _gang_context


class Feed(Protocol):
    """The inputs fed to a running request, in order (``replica/feed.py``)."""

    async def get(self) -> dict[str, Any]: ...


@dataclasses.dataclass(eq=False)
class RequestContext:
    """The request a replica is running; nested handle calls inherit its id and are its children.

    ``children`` lets the replica cancel every request made on behalf of a cancelled one.
    ``deadline_s`` is the ``time.monotonic()`` by which it must finish (0.0: none).
    """

    request_id: str
    app_name: str = ""
    deployment: str = ""
    method: str = ""
    multiplexed_model_id: str = ""
    route: str = ""  # Ray's field; the HTTP route prefix is not tracked per request here
    children: set[Cancellable] = dataclasses.field(default_factory=set)
    # Inputs the caller feeds to the running request (an ingress request's ASGI messages).
    feed: Feed | None = None
    deadline_s: float = 0.0
    trace: Any = None  # its span and context token, with tracing on (serve._tracing)


_replica_context: ReplicaContext | None = None
_gang_context: GangContext | None = None
# In local testing mode several deployments share one process: each call sees its own.
local_replica_context: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "serve_local_replica_context", default=None
)
_request_context: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "serve_request_context", default=None
)
# The time.monotonic() by which requests made in this context must finish (0.0: no deadline).
# A float, not an optional object: handle.remote() reads it on every call.
_deadline: contextvars.ContextVar[float] = contextvars.ContextVar(
    "serve_request_deadline", default=0.0
)


def current_gang_context() -> GangContext | None:
    return _gang_context


def set_gang_context(context: GangContext | None) -> None:
    """The replica process's gang, set once at start (serve-replica --gang)."""
    global _gang_context
    _gang_context = context


def set_replica_context(context: ReplicaContext | None) -> None:
    global _replica_context
    _replica_context = context


def replica_context() -> ReplicaContext | None:
    return local_replica_context.get() or _replica_context


def get_replica_context() -> ReplicaContext:
    """The context of the replica this code runs in.

    Raises ServeError outside a deployment.
    """
    context = replica_context()
    if context is None:
        raise ServeError(
            "`serve.get_replica_context()` may only be called from within a serve deployment."
        )
    return context


def current_request() -> RequestContext | None:
    return _request_context.get()


def set_current_request(context: RequestContext | None) -> contextvars.Token[Any]:
    return _request_context.set(context)


def reset_current_request(token: contextvars.Token[Any]) -> None:
    _request_context.reset(token)


# The callers of the @serve.batch call running in this context (empty outside one).
_batch_requests: contextvars.ContextVar[tuple[RequestContext, ...]] = contextvars.ContextVar(
    "serve_batch_requests", default=()
)


def batch_requests() -> tuple[RequestContext, ...]:
    return _batch_requests.get()


def set_batch_requests(requests: tuple[RequestContext, ...]) -> None:
    _batch_requests.set(requests)


def get_multiplexed_model_id() -> str:
    """The multiplexed model id of the request being served, or ``""`` when it has none."""
    context = _request_context.get()
    return context.multiplexed_model_id if context is not None else ""


def current_deadline() -> float:
    """The ``time.monotonic()`` deadline requests made here inherit, or 0.0 for none."""
    return _deadline.get()


def set_current_deadline(deadline_s: float) -> contextvars.Token[float]:
    """Set the inherited deadline as is (a replica, for the request it serves)."""
    return _deadline.set(deadline_s)


@contextlib.contextmanager
def request_deadline(timeout_s: float | None) -> Iterator[float]:
    """Requests made in this scope (and every nested call made to serve them) must finish
    within ``timeout_s`` seconds from now. Yields the deadline (``time.monotonic()``; 0.0: none).

    Private: the ingress proxy sets it from an HTTP ``request_timeout_s`` or a gRPC client's
    deadline, and tests use it. A nested scope never extends the deadline it is in: the earlier
    one wins. ``None`` or ``math.inf`` add no deadline; a budget of zero or less has already
    passed, so requests made in the scope fail at once with ``RequestTimeoutError``.

    Example::

        with request_deadline(0.5):
            response = handle.remote(body)  # carries the 0.5 s budget to the replica
    """
    if timeout_s is None or timeout_s == math.inf:
        yield _deadline.get()
        return
    if math.isnan(timeout_s):
        raise ValueError("request_deadline(timeout_s) needs a number of seconds, not NaN.")
    # A deadline that passed is still a deadline: it must not read as 0.0 ("none").
    deadline_s = max(time.monotonic() + timeout_s, 1e-9)
    inherited = _deadline.get()
    if inherited and inherited < deadline_s:
        deadline_s = inherited
    token = _deadline.set(deadline_s)
    try:
        yield deadline_s
    finally:
        _deadline.reset(token)
