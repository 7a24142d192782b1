"""One request in flight: its arguments, its place in the router, and its outcome."""

from __future__ import annotations

import enum
import os
import time
from typing import TYPE_CHECKING, Any

from serve._context import RequestContext
from serve._serialization import EncodedArgs, codec_id
from serve._sync import Completion, ItemQueue
from serve.exceptions import ServeError

if TYPE_CHECKING:
    from serve._deployment_state import Connection
    from serve._options import HandleOptions
    from serve._router import Router
    from serve._rpc.connection import ConnectionLost


class CallState(enum.IntEnum):
    RESOLVING = 0  # waiting for DeploymentResponse arguments
    QUEUED = 1  # waiting for a replica
    SENT = 2  # sent; no admission answer yet
    ACCEPTED = 3  # a replica admitted it
    DONE = 4


class ResponseBase:
    """Base of the response facades, so the router can spot them among arguments."""

    __slots__ = ("_call",)

    def __init__(self, call: Call) -> None:
        self._call = call


def new_request_id() -> str:
    return os.urandom(16).hex()


class Call:
    """A request, from ``handle.remote()`` to its outcome (the connection's Exchange)."""

    __slots__ = (
        "answered",
        "args",
        "args_blob",
        "args_buffer_count",
        "buffers",
        "cancelled",
        "completion",
        "conn",
        "created_s",
        "frame_id",
        "holds_queue_slot",
        "inputs",
        "kwargs",
        "kwargs_blob",
        "method",
        "model_id",
        "no_reject",
        "parent",
        "prefer_local",
        "replica_id",
        "request_codec",
        "request_id",
        "response_codec",
        "router",
        "seq",
        "state",
        "stream",
        "stream_buffer",
    )

    def __init__(
        self,
        router: Router,
        seq: int,
        options: HandleOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        parent: RequestContext | None,
    ) -> None:
        self.router = router
        self.seq = seq
        self.method = options.method_name
        self.model_id = options.multiplexed_model_id
        self.stream = options.stream
        self.prefer_local = options.prefer_local_routing
        self.no_reject = False
        self.request_codec = codec_id(options.request_serialization)
        self.response_codec = codec_id(options.response_serialization)
        self.parent = parent
        self.request_id = parent.request_id if parent is not None else new_request_id()
        self.created_s = time.monotonic()
        self.state = CallState.RESOLVING
        self.cancelled = False
        self.holds_queue_slot = False
        self.completion = Completion()
        self.stream_buffer: ItemQueue | None = ItemQueue() if options.stream else None
        self.replica_id = ""
        self.answered = False  # the replica answered admission for the current send
        self.conn: Connection | None = None
        self.frame_id = 0
        self.args_blob = b""
        self.kwargs_blob = b""
        self.buffers: list[bytes] = []
        self.args_buffer_count = 0
        self.inputs: list[tuple[int | str, Call]] | None = None
        self.args = args
        self.kwargs = kwargs
        for position, value in enumerate(args):
            self._note_input(position, value)
        for key, value in kwargs.items():
            self._note_input(key, value)
        if self.inputs is None:
            self.encode(args, kwargs)

    def _note_input(self, where: int | str, value: Any) -> None:
        if isinstance(value, ResponseBase):
            call = value._call
            if call.stream:
                raise ServeError(
                    "A DeploymentResponseGenerator (stream=True) cannot be passed to another "
                    "call; iterate it and pass the items instead."
                )
            if self.inputs is None:
                self.inputs = []
            self.inputs.append((where, call))

    def encode(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        encoded = EncodedArgs(self.request_codec, args, kwargs)
        self.args_blob, self.kwargs_blob = encoded.args, encoded.kwargs
        self.buffers, self.args_buffer_count = encoded.buffers, encoded.args_buffer_count
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

    def __repr__(self) -> str:
        return (
            f"Call({self.router.deployment_id}.{self.method}, id={self.request_id[:8]}, "
            f"state={self.state.name})"
        )

    # Exchange: what the replica connection reports (home loop).

    def on_accepted(self, ongoing: int) -> None:
        self.router.on_accepted(self, ongoing)

    def on_rejected(self, ongoing: int, draining: bool) -> None:
        self.router.on_rejected(self, ongoing, draining)

    def on_result(self, body: memoryview, ongoing: int, buffers: list[bytes] | None) -> None:
        self.router.on_result(self, body, ongoing, buffers)

    def on_error(self, error: BaseException, cancelled: bool, user: bool, ongoing: int) -> None:
        self.router.on_error(self, error, cancelled, ongoing)

    def on_item(self, body: memoryview, buffers: list[bytes] | None) -> None:
        self.router.on_item(self, body, buffers)

    def on_end(self, ongoing: int) -> None:
        self.router.on_end(self, ongoing)

    def on_lost(self, error: ConnectionLost) -> None:
        self.router.on_lost(self, error)
