"""Who is running: the replica context (per process) and the request context (per request)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any, Protocol

from serve._models import ReplicaID
from serve.exceptions import ServeError


class Cancellable(Protocol):
    """A request made on behalf of another one (a child), as the replica needs to see it."""

    def cancel(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What ``serve.get_replica_context()`` returns inside a replica."""

    app_name: str
    deployment: str
    replica_tag: str
    replica_id: ReplicaID
    servable_object: Any = None
    rank: int | None = None
    world_size: int | None = None
    node_id: str = ""  # the node the replica runs on (SERVE_NODE_ID, else the hostname)


@dataclasses.dataclass(eq=False)
class RequestContext:
    """The request a replica is running; nested handle calls inherit its id and are its children.

    ``children`` lets the replica cancel every request made on behalf of a cancelled one.
    """

    request_id: str
    app_name: str = ""
    deployment: str = ""
    method: str = ""
    multiplexed_model_id: str = ""
    children: set[Cancellable] = dataclasses.field(default_factory=set)
    # Inputs the caller feeds to the running request (an ingress request's ASGI messages).
    feed: asyncio.Queue[bytes] | None = None


_replica_context: ReplicaContext | None = None
# In local testing mode several deployments share one process: each call sees its own.
local_replica_context: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "serve_local_replica_context", default=None
)
_request_context: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "serve_request_context", default=None
)


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


def get_multiplexed_model_id() -> str:
    """The multiplexed model id of the request being served, or ``""`` when it has none."""
    context = _request_context.get()
    return context.multiplexed_model_id if context is not None else ""


@contextlib.contextmanager
def request_deadline(timeout_s: float) -> Iterator[None]:
    """Requests made in this scope must finish within ``timeout_s`` (interim: the deadline
    branch carries it through nested calls)."""
    yield
