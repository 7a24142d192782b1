"""What the router core and a replica connection exchange: plain data and two protocols.

The router core (``serve._router``, ``serve._routing_state``) never sees protobuf or gRPC, and
the wire edge (``serve._rpc.connection``) never sees routers: a request crosses as an
:class:`Envelope` through a :class:`Connection`, and what the replica answers comes back to a
:class:`ReplyListener` together with the caller's own token for the request.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol


@dataclasses.dataclass(slots=True)
class Envelope:
    """One request as it goes on the wire: routing facts plus the encoded arguments."""

    method: str
    request_id: str
    request_codec: int
    response_codec: int
    model_id: str = ""
    stream: bool = False
    no_reject: bool = False  # broadcast: wait for a slot instead of being rejected
    stream_window: int = 0  # stream items the replica may send before the consumer's credit
    stream_window_bytes: int = 0  # ... and bytes (item bodies plus their buffers)
    # The time.monotonic() of this process by which it must finish (0.0: none). The wire carries
    # the time left instead, since another host's clock has another origin.
    deadline_s: float = 0.0
    args: bytes = b""
    kwargs: bytes = b""
    buffers: list[bytes] = dataclasses.field(default_factory=list)  # out of band, args first
    args_buffer_count: int = 0
    trace_context: dict[str, str] | None = None  # W3C trace context, with tracing on


class ConnectionLost(Exception):
    """The stream to a replica broke. ``retryable`` is False when retrying cannot help.

    ``read_upto``: when the replica closed the stream itself, the highest frame id it had read;
    later requests never reached it.
    """

    def __init__(
        self, message: str, *, retryable: bool = True, read_upto: int | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.read_upto = read_upto


class ReplyListener(Protocol):
    """Who hears what a replica answered about one request (on the home loop).

    ``request`` is the token the listener passed with the envelope. Exactly one of
    ``on_rejected``, ``on_result``, ``on_error``, ``on_end`` or ``on_lost`` ends a request;
    ``on_item`` may come before ``on_end``, ``on_error`` or ``on_lost``. A reservation (a slot
    held for a request to come) ends with ``on_reserved``, ``on_rejected`` or ``on_lost``.
    """

    def on_rejected(self, request: Any, draining: bool) -> None: ...
    def on_reserved(self, request: Any) -> None: ...
    def on_result(self, request: Any, body: memoryview, buffers: list[bytes] | None) -> None: ...
    def on_error(self, request: Any, error: BaseException, cancelled: bool) -> None: ...
    def on_item(self, request: Any, body: memoryview, buffers: list[bytes] | None) -> None: ...
    def on_input_read(self, request: Any, count: int, nbytes: int) -> None:
        """The running request read ``count`` more of its fed inputs (``nbytes`` bytes)."""

    def on_end(self, request: Any) -> None: ...
    def on_lost(self, request: Any, error: ConnectionLost, written: bool) -> None:
        """The connection broke first. ``written``: the request had been handed to gRPC, so
        the replica may have run it; otherwise it certainly did not."""


class Connection(Protocol):
    """What routers need of a replica connection (a ReplicaConnection, or a fake in tests)."""

    replica_id: str
    broken: ConnectionLost | None

    def send(
        self,
        envelope: Envelope,
        listener: ReplyListener,
        request: Any,
        reservation_frame_id: int = 0,
    ) -> int: ...
    def reserve(self, listener: ReplyListener, request: Any) -> int: ...
    def release(self, frame_id: int) -> None: ...
    def cancel(self, frame_id: int) -> None: ...
    def credit(self, frame_id: int, count: int, nbytes: int) -> None: ...
    def feed(self, frame_id: int, payload: bytes) -> None: ...
    async def queue_length(self, timeout_s: float) -> tuple[int, bool]: ...
    async def aclose(self) -> None: ...
