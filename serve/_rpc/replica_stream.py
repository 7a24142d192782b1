"""The replica's end of a Connect stream: frames in as plain calls, answers out as frames.

The replica's session (``replica.session``) never sees protobuf: each frame a router sends
reaches a :class:`FrameListener` as a call with plain data (a REQUEST as an
:class:`IncomingRequest`), and every answer leaves through a :class:`ReplicaStream` method that
builds its frame header here, as ``serve._rpc.connection`` does for routers. The stream also
owns the frame lane (coalesced writes) and the stream's shared-memory segments.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final, Protocol

import grpc
import grpc.aio

from serve._proto.common_pb2 import ErrorInfo
from serve._proto.replica_pb2 import (
    ERROR_KIND_CANCELLED,
    ERROR_KIND_SYSTEM,
    ERROR_KIND_USER,
    FRAME_KIND_CANCEL,
    FRAME_KIND_CREDIT,
    FRAME_KIND_ERROR,
    FRAME_KIND_INPUT,
    FRAME_KIND_INPUT_CREDIT,
    FRAME_KIND_REJECTED,
    FRAME_KIND_RELEASE,
    FRAME_KIND_REQUEST,
    FRAME_KIND_RESERVE,
    FRAME_KIND_RESERVED,
    REJECT_REASON_DRAINING,
    REJECT_REASON_FULL,
    FrameHeader,
)
from serve._rpc import shm
from serve._rpc.channel import Context
from serve._rpc.frames import FrameError, FrameLane, item_header, outcome_header, read_frames
from serve._rpc.status import error_info
from serve._settings import settings

__all__ = [
    "ErrorKind",
    "ErrorReply",
    "FrameError",
    "FrameListener",
    "IncomingRequest",
    "ReplicaStream",
]


class ErrorKind(enum.IntEnum):
    """Whose fault an error answer is: the user's code, the system, or a cancellation."""

    USER = ERROR_KIND_USER
    SYSTEM = ERROR_KIND_SYSTEM
    CANCELLED = ERROR_KIND_CANCELLED


@dataclasses.dataclass(slots=True, frozen=True)
class ErrorReply:
    """An error answer, described for the wire (and for the request's trace span)."""

    kind: ErrorKind
    type_name: str
    message: str
    traceback: str
    pickled: bytes

    @classmethod
    def of(cls, exc: BaseException, kind: ErrorKind) -> ErrorReply:
        """Describe ``exc`` (a cancellation without its traceback); never raises."""
        info = error_info(exc, with_traceback=kind is not ErrorKind.CANCELLED)
        return cls(kind, info.type_name, info.message, info.traceback, info.pickled)


@dataclasses.dataclass(slots=True)
class IncomingRequest:
    """One REQUEST frame, as the replica needs it: the envelope's fields, the time left
    (``timeout_s``; a budget, since clocks differ between hosts) and the encoded arguments
    (``body``: args then kwargs, split at ``args_len``; ``buffers`` out of band, args first)."""

    frame_id: int
    method: str
    request_id: str
    model_id: str
    request_codec: int
    response_codec: int
    stream: bool
    stream_window: int
    stream_window_bytes: int
    timeout_s: float
    reserved: bool  # sent in a slot held by RESERVE (same frame id)
    no_reject: bool  # broadcast: waits for a slot instead of being rejected
    trace_context: Mapping[str, str]
    body: memoryview
    args_len: int
    args_buffer_count: int
    buffers: list[bytes] | None


class FrameListener(Protocol):
    """What a replica's session hears from its router (on the replica's loop).

    A listener may raise :class:`FrameError` for a frame that breaks the protocol: the stream
    then ends with an error saying so.
    """

    def on_request(self, request: IncomingRequest) -> None: ...
    def on_cancel(self, frame_id: int) -> None: ...
    def on_input(self, frame_id: int, body: memoryview) -> None: ...
    def on_credit(self, frame_id: int, count: int, nbytes: int) -> None: ...
    def on_reserve(self, frame_id: int) -> None: ...
    def on_release(self, frame_id: int) -> None: ...


_NO_TRACE_CONTEXT: Final[Mapping[str, str]] = MappingProxyType({})


def _request(header: FrameHeader, body: memoryview, buffers: list[bytes] | None) -> IncomingRequest:
    trace_context = header.trace_context
    return IncomingRequest(
        header.frame_id,
        header.method,
        header.request_id,
        header.model_id,
        header.request_codec,
        header.response_codec,
        header.stream,
        header.stream_window,
        header.stream_window_bytes,
        header.timeout_s,
        header.reserved,
        header.no_reject,
        dict(trace_context) if trace_context else _NO_TRACE_CONTEXT,
        body,
        header.args_len,
        header.args_buffer_count,
        buffers,
    )


class ReplicaStream:
    """One Connect stream at the replica: reads frames for a listener, writes answers."""

    def __init__(self, context: Context, shm_token: str = "") -> None:
        """``shm_token``: the stream's shared-memory token, when the router proved it shares
        this host's /dev/shm (serve/_rpc/shm.py); its segments are removed when it ends."""
        self._context = context
        self._lane = FrameLane(context.write)
        self.idle = self._lane.idle  # nothing queued for the router and nothing being written
        self._segments: shm.SegmentLane | None = None
        if shm_token:
            self._segments = self._lane.writer.segments = shm.SegmentLane(
                shm_token, router=False, min_bytes=settings().shm_min_bytes
            )

    async def read(self, listener: FrameListener) -> None:
        """Hand every frame to ``listener`` until the router half-closes. A malformed batch
        (or a frame the listener refuses) ends the call with INVALID_ARGUMENT."""
        context = self._context
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                frames = await read_frames(message, context.read, self._segments)
                for header, body, buffers in frames:
                    kind = header.kind
                    if kind == FRAME_KIND_REQUEST:
                        listener.on_request(_request(header, body, buffers))
                    elif kind == FRAME_KIND_CANCEL:
                        listener.on_cancel(header.frame_id)
                    elif kind == FRAME_KIND_INPUT:
                        listener.on_input(header.frame_id, body)
                    elif kind == FRAME_KIND_CREDIT:
                        listener.on_credit(header.frame_id, header.credit, header.credit_bytes)
                    elif kind == FRAME_KIND_RESERVE:
                        listener.on_reserve(header.frame_id)
                    elif kind == FRAME_KIND_RELEASE:
                        listener.on_release(header.frame_id)
                    else:
                        raise FrameError(f"Unexpected frame kind {kind} from a router.")
        except FrameError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed batch: {exc}")

    async def write(self) -> None:
        """Write what is sent, until cancelled."""
        await self._lane.run()

    async def flush(self) -> None:
        await self._lane.flush()

    def sweep_router_segments(self) -> None:
        """The router's segments nobody will read now (the stream ended)."""
        if self._segments is not None:
            self._segments.sweep(own=False)

    async def remove_segments(self, linger_s: float) -> None:
        """Remove this stream's segments, after ``linger_s`` for a live router to take the
        last ones (0: at once)."""
        segments = self._segments
        if segments is not None:
            if linger_s > 0:
                await segments.linger(linger_s)
            segments.sweep()

    # The answers. Each but ITEM and INPUT_CREDIT carries the replica's ongoing count and the
    # highest frame id read (``acked``), which the router's queue-length estimate needs.

    def outcome(
        self,
        frame_id: int,
        ongoing: int,
        acked: int,
        *body: bytes | memoryview,
        end: bool = False,
        buffers: Sequence[bytes] = (),
    ) -> None:
        """RESULT (its body and buffers), or with ``end`` a stream's END."""
        self._lane.send_encoded(
            outcome_header(frame_id, ongoing, acked, end=end), frame_id, *body, buffers=buffers
        )

    def item(self, frame_id: int, payload: bytes, buffers: Sequence[bytes] = ()) -> None:
        self._lane.send_encoded(item_header(frame_id), frame_id, payload, buffers=buffers)

    def error(self, frame_id: int, error: ErrorReply, ongoing: int, acked: int) -> None:
        info = ErrorInfo(
            type_name=error.type_name,
            message=error.message,
            traceback=error.traceback,
            pickled=error.pickled,
        )
        self._lane.send(
            FrameHeader(
                kind=FRAME_KIND_ERROR,
                frame_id=frame_id,
                error_kind=error.kind.value,
                error=info,
                ongoing=ongoing,
                acked=acked,
            )
        )

    def rejected(self, frame_id: int, draining: bool, ongoing: int, acked: int) -> None:
        reason = REJECT_REASON_DRAINING if draining else REJECT_REASON_FULL
        self._lane.send(
            FrameHeader(
                kind=FRAME_KIND_REJECTED,
                frame_id=frame_id,
                reject_reason=reason,
                ongoing=ongoing,
                acked=acked,
            )
        )

    def reserved(self, frame_id: int, ongoing: int, acked: int) -> None:
        self._lane.send(
            FrameHeader(kind=FRAME_KIND_RESERVED, frame_id=frame_id, ongoing=ongoing, acked=acked)
        )

    def input_credit(self, frame_id: int, count: int, nbytes: int) -> None:
        self._lane.send(
            FrameHeader(
                kind=FRAME_KIND_INPUT_CREDIT, frame_id=frame_id, credit=count, credit_bytes=nbytes
            )
        )
