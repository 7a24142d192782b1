"""One call in flight, and its attempts: what the caller made, and where the router tried it.

A :class:`Request` is the call: its envelope, its arguments, its outcome (the completion the
caller waits on) and its place in the router's queue. An :class:`Attempt` is one try of it on
one replica: the connection it went on and its frame id there. A rejected attempt is followed
by another; a written one that is lost is not (the replica may have run it). A
:class:`Reservation` is an attempt whose slot is held for a call to come: the call sent in it
makes that one attempt, never rejected and never tried elsewhere.

Both are data. A request does not know its router: the router that queued it hears about it
from connections (as their :class:`~serve._exchange.ReplyListener`), and whoever must cancel it
(its caller, or the replica cancelling a parent request) calls :meth:`Request.cancel`, which
runs the cancel callback the router gave it.
"""

from __future__ import annotations

import asyncio
import enum
import os
import random
import time
from collections.abc import Callable
from typing import Any

from serve._context import RequestContext
from serve._exchange import Connection, Envelope
from serve._models import ReplicaInfo
from serve._options import HandleOptions
from serve._serialization import EncodedArgs, codec_id
from serve._settings import settings
from serve._sync import Completion, ItemQueue
from serve.exceptions import ServeError


class RequestState(enum.IntEnum):
    RESOLVING = 0  # waiting for DeploymentResponse arguments
    QUEUED = 1  # waiting for a replica
    SENT = 2  # its attempt is on a replica's connection; no answer yet
    DONE = 3


class ResponseBase:
    """Base of the response facades, so a request can spot them among its arguments."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request


def _seeded() -> random.Random:
    return random.Random(os.urandom(32))


# Request ids need to be unique, not secret: a generator seeded from the OS (again in a forked
# child) instead of a getrandom() call per request, which cost about 20 us in profiles.
_ids = _seeded()
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def new_request_id() -> str:
    return f"{_ids.getrandbits(128):032x}"


class InputWindow:
    """The inputs fed to a running request that its replica has not read yet, and room for
    more: a feeder waits while ``max_messages`` or ``max_bytes`` are in flight, so a request
    body or a WebSocket flows only as fast as the replica reads it. One input larger than the
    whole window goes alone. Home loop only."""

    __slots__ = ("_room", "bytes", "max_bytes", "max_messages", "messages")

    def __init__(self, max_bytes: int, max_messages: int) -> None:
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.bytes = 0
        self.messages = 0
        self._room: asyncio.Event | None = None

    def full(self) -> bool:
        return self.messages >= self.max_messages or self.bytes >= self.max_bytes

    def sent(self, nbytes: int) -> None:
        self.messages += 1
        self.bytes += nbytes

    def read(self, count: int, nbytes: int) -> None:
        """The replica read ``count`` inputs of ``nbytes``."""
        self.messages = max(self.messages - count, 0)
        self.bytes = max(self.bytes - nbytes, 0)
        if self._room is not None and not self.full():
            self._room.set()

    async def room(self) -> None:
        """Until one more input may be sent."""
        while self.full():
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()


class Attempt:
    """One try of a request on one replica: the connection it was sent on and its frame id
    there. A rejected attempt is followed by another; a written one that is lost is not."""

    __slots__ = ("conn", "frame_id", "replica")

    def __init__(self, replica: ReplicaInfo, conn: Connection, frame_id: int) -> None:
        self.replica = replica
        self.conn = conn
        self.frame_id = frame_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.replica.replica_id}, frame_id={self.frame_id})"


class Reservation(Attempt):
    """A slot held on one replica for one request to come (``handle.choose_replica``): the
    request later sent in it makes this attempt, under its frame id on its connection, and is
    never rejected; if the slot is gone, the request fails instead of trying elsewhere."""

    __slots__ = ()


class Request:
    """A call, from ``handle.remote()`` to its outcome, and its place in its router (state,
    queue slot, deadline timer) across its attempts."""

    __slots__ = (
        "_on_cancel",
        "args",
        "attempt",
        "cancelled",
        "completion",
        "created_s",
        "deadline_timer",
        "envelope",
        "fed",
        "holds_queue_slot",
        "inputs",
        "kwargs",
        "parent",
        "prefer_local",
        "reserve_only",
        "seq",
        "span",
        "state",
        "stream_buffer",
        "window",
    )

    def __init__(
        self,
        seq: int,
        options: HandleOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        parent: RequestContext | None,
        on_cancel: Callable[[Request, bool], None],
        deadline_s: float = 0.0,
    ) -> None:
        self.seq = seq
        stream = options.stream
        self.envelope = Envelope(
            method=options.method_name,
            request_id=parent.request_id if parent is not None else new_request_id(),
            request_codec=codec_id(options.request_serialization),
            response_codec=codec_id(options.response_serialization),
            model_id=options.multiplexed_model_id,
            stream=stream,
            deadline_s=deadline_s,
        )
        self.prefer_local = options.prefer_local_routing
        self.parent = parent
        self._on_cancel = on_cancel
        self.created_s = time.monotonic()
        self.deadline_timer: asyncio.TimerHandle | None = None  # the router's, while it waits
        self.state = RequestState.RESOLVING
        self.cancelled = False
        self.holds_queue_slot = False
        self.completion = Completion()
        self.stream_buffer: ItemQueue | None = ItemQueue() if stream else None
        self.span: Any = None  # its route_to_replica span, with tracing on (serve._tracing)
        # Its current try on a replica (SENT), or its last one; None before the first. A request
        # sent by handle.dispatch() comes with its one attempt: the Reservation it is sent in.
        self.attempt: Attempt | None = None
        # handle.choose_replica(): a request that only makes a reservation (its result).
        self.reserve_only = False
        # Inputs fed to the running request (the proxy's ASGI messages), kept until the replica
        # proves it admitted the request (its first item), so a rejected request is re-fed.
        self.fed: list[bytes] | tuple[()] | None = None
        self.window: InputWindow | None = None  # what was fed and not yet read by the replica
        self.inputs: list[tuple[int | str, Request]] | None = None
        self.args = args
        self.kwargs = kwargs
        for position, value in enumerate(args):
            if isinstance(value, ResponseBase):
                self._note_input(position, value._request)
        for key, value in kwargs.items():
            if isinstance(value, ResponseBase):
                self._note_input(key, value._request)
        if self.inputs is None:
            self.encode(args, kwargs)

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    @property
    def method(self) -> str:
        return self.envelope.method

    @property
    def model_id(self) -> str:
        return self.envelope.model_id

    @property
    def stream(self) -> bool:
        return self.envelope.stream

    def _note_input(self, where: int | str, upstream: Request) -> None:
        """An argument is a DeploymentResponse: the request resolves it before it is queued."""
        if upstream.stream:
            raise ServeError(
                "A DeploymentResponseGenerator (stream=True) cannot be passed to another "
                "call; iterate it and pass the items instead."
            )
        if self.inputs is None:
            self.inputs = []
        self.inputs.append((where, upstream))

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        envelope = self.envelope
        encoded = EncodedArgs(envelope.request_codec, args, kwargs)
        size = len(encoded.args) + len(encoded.kwargs)
        for buffer in encoded.buffers:
            size += len(buffer)
        limit = settings().max_message_bytes
        if size > limit:
            raise ValueError(
                f"The arguments of this call to {envelope.method!r} are {size} bytes, over the "
                f"{limit}-byte message limit (SERVE_MAX_MESSAGE_BYTES). Send less per call (or "
                "stream it in parts), or raise SERVE_MAX_MESSAGE_BYTES where the driver and the "
                "controller run (replicas inherit it), up to 2 GiB - 1."
            )
        envelope.args, envelope.kwargs = encoded.args, encoded.kwargs
        envelope.buffers, envelope.args_buffer_count = encoded.buffers, encoded.args_buffer_count
        self.args = ()
        self.kwargs = {}

    def resolved_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments with every DeploymentResponse replaced by its value (all are done)."""
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for where, upstream in self.inputs or ():
            value = upstream.completion.outcome()
            if isinstance(where, int):
                args[where] = value
            else:
                kwargs[where] = value
        return tuple(args), kwargs

    def cancel(self) -> None:
        """Cancel the request (home loop): its router drops or cancels it. Idempotent."""
        self.cancelled = True
        self._on_cancel(self, False)

    def expire(self) -> None:
        """End the request with ``RequestTimeoutError`` (home loop): the deadline it inherited
        passed. Its replica, which has the same deadline, ends the work on its own."""
        self._on_cancel(self, True)

    def copy_for_broadcast(self) -> Request:
        """The same encoded request with its own outcome, never rejected, never streamed."""
        copy = Request.__new__(Request)
        for slot in Request.__slots__:
            setattr(copy, slot, getattr(self, slot))
        copy.envelope = Envelope(
            **{f: getattr(self.envelope, f) for f in Envelope.__dataclass_fields__}
        )
        copy.envelope.no_reject = True
        copy.envelope.stream = False
        copy.completion = Completion()
        copy.stream_buffer = None
        return copy

    def __repr__(self) -> str:
        return f"Request({self.method}, id={self.request_id[:8]}, state={self.state.name})"
