"""The router side of a replica's multiplexed Connect stream.

One ``ReplicaConnection`` per replica per process carries every request of every router in the
process to that replica, over one bidirectional stream. Each request gets a frame id on its
connection; replies are matched by frame id and reported to the request's :class:`ReplyListener`
as plain values (no protobuf leaves this module). Writes are coalesced: whatever is queued when
the writer is free goes out as one message.

A request counts as *written* once its frame was taken for writing to gRPC: if the stream breaks
before its answer, it may have run (the listener hears ``written=True``); a request still queued
here when the stream breaks certainly did not run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from serve._exchange import ConnectionLost, Envelope, ReplyListener
from serve._proto.replica_pb2 import (
    ERROR_KIND_CANCELLED,
    FRAME_KIND_CANCEL,
    FRAME_KIND_CREDIT,
    FRAME_KIND_END,
    FRAME_KIND_ERROR,
    FRAME_KIND_INPUT,
    FRAME_KIND_INPUT_CREDIT,
    FRAME_KIND_ITEM,
    FRAME_KIND_REJECTED,
    FRAME_KIND_RELEASE,
    FRAME_KIND_RESERVE,
    FRAME_KIND_RESERVED,
    FRAME_KIND_RESULT,
    REJECT_REASON_DRAINING,
    FrameHeader,
    QueueLengthRequest,
    QueueLengthResponse,
)
from serve._rpc import shm
from serve._rpc.channel import TlsFiles, open_channel, token_metadata
from serve._rpc.frames import FrameError, FrameLane, read_frames, request_header
from serve._rpc.status import rebuild
from serve._settings import ACKED_METADATA_KEY, REPLICA_ID_METADATA_KEY, settings

logger = logging.getLogger(__name__)

CONNECT_METHOD = "/serve.v1.Replica/Connect"
QUEUE_LENGTH_METHOD = "/serve.v1.Replica/QueueLength"

# (ongoing, acked): the replica's ongoing count and the highest frame id it had read then.
OnLoad = Callable[[int, int], None]

MIN_TIMEOUT_S = 1e-6

_TERMINAL = frozenset(
    {FRAME_KIND_REJECTED, FRAME_KIND_RESULT, FRAME_KIND_ERROR, FRAME_KIND_END, FRAME_KIND_RESERVED}
)


class ReplicaConnection:
    """One Connect stream to one replica; opened on first use, never reopened once broken."""

    def __init__(
        self,
        replica_id: str,
        address: str,
        *,
        token: str | None,
        tls: TlsFiles | None,
        on_load: OnLoad,
        on_broken: Callable[[ReplicaConnection, ConnectionLost], None],
    ) -> None:
        self.replica_id = replica_id
        self.address = address
        self._token = token
        self._tls = tls
        self._on_load = on_load
        self._on_broken = on_broken
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
        self._lane: FrameLane | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, tuple[ReplyListener, Any]] = {}
        self._next_frame_id = 0
        self._written_upto = 0  # frame ids up to this one were taken for writing
        self.broken: ConnectionLost | None = None
        self._closed = False
        # Shared memory for big buffers, once the replica proved it shares our /dev/shm.
        self._hello: shm.Hello | None = None
        self._segments: shm.SegmentLane | None = None

    def __repr__(self) -> str:
        state = "broken" if self.broken else "closed" if self._closed else "open"
        return (
            f"ReplicaConnection({self.replica_id!r}, {self.address}, {state}, "
            f"pending={len(self._pending)})"
        )

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def _start(self) -> FrameLane:
        self._channel = open_channel(self.address, self._tls)
        connect: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self._channel.stream_stream(
            CONNECT_METHOD
        )
        metadata = [*token_metadata(self._token), (REPLICA_ID_METADATA_KEY, self.replica_id)]
        if settings().shm_min_bytes and shm.available():
            hello = shm.Hello()
            if hello.create():
                self._hello = hello
                metadata.append((shm.TOKEN_METADATA_KEY, hello.token))
                # Read from the start: a replica that read the hello file writes segments.
                self._segments = shm.SegmentLane(
                    hello.token, router=True, min_bytes=settings().shm_min_bytes
                )
        call = self._call = connect(metadata=tuple(metadata))
        lane = self._lane = FrameLane(call.write)
        lane.on_written = self._written
        self._tasks = [
            asyncio.create_task(self._write_loop(call, lane), name=f"conn:write:{self.replica_id}"),
            asyncio.create_task(self._read_loop(call), name=f"conn:read:{self.replica_id}"),
        ]
        return lane

    def _written(self, upto: int) -> None:
        if upto > self._written_upto:
            self._written_upto = upto

    def send(
        self,
        envelope: Envelope,
        listener: ReplyListener,
        request: Any,
        reservation_frame_id: int = 0,
    ) -> int:
        """Queue a request frame; returns its frame id on this connection.

        ``reservation_frame_id``: the frame id of a slot held by :meth:`reserve`; the request runs
        in it.
        """
        if self.broken is not None:
            raise self.broken
        lane = self._lane or self._start()
        if reservation_frame_id:
            frame_id = reservation_frame_id
        else:
            self._next_frame_id += 1
            frame_id = self._next_frame_id
        self._pending[frame_id] = (listener, request)
        deadline_s = envelope.deadline_s
        encoded = request_header(
            frame_id,
            (
                envelope.method,
                envelope.request_codec,
                envelope.response_codec,
                envelope.model_id,
                envelope.stream,
                envelope.no_reject,
                envelope.stream_window,
                envelope.stream_window_bytes,
            ),
            request_id=envelope.request_id,
            args_len=len(envelope.args),
            args_buffer_count=envelope.args_buffer_count,
            # The time left, never 0 (which means no deadline): a request whose deadline passed
            # meanwhile reaches a replica that answers RequestTimeoutError without running it.
            timeout_s=max(deadline_s - time.monotonic(), MIN_TIMEOUT_S) if deadline_s else 0.0,
            reserved=bool(reservation_frame_id),
            trace_context=envelope.trace_context,
        )
        lane.send_encoded(
            encoded, frame_id, envelope.args, envelope.kwargs, buffers=envelope.buffers
        )
        return frame_id

    def reserve(self, listener: ReplyListener, request: Any) -> int:
        """Ask the replica to hold a slot; the listener hears ``on_reserved`` or
        ``on_rejected``. Returns the frame id the request must be sent under."""
        if self.broken is not None:
            raise self.broken
        lane = self._lane or self._start()
        self._next_frame_id += 1
        frame_id = self._next_frame_id
        self._pending[frame_id] = (listener, request)
        lane.send(FrameHeader(kind=FRAME_KIND_RESERVE, frame_id=frame_id))
        return frame_id

    def release(self, frame_id: int) -> None:
        """Give back a slot held by :meth:`reserve` and never used."""
        if self.broken is None and self._lane is not None:
            self._lane.send(FrameHeader(kind=FRAME_KIND_RELEASE, frame_id=frame_id))

    def cancel(self, frame_id: int) -> None:
        """Ask the replica to cancel a request; its reply still arrives (ERROR, cancelled)."""
        if self.broken is None and self._lane is not None and frame_id in self._pending:
            self._lane.send(FrameHeader(kind=FRAME_KIND_CANCEL, frame_id=frame_id))

    def credit(self, frame_id: int, count: int, nbytes: int) -> None:
        if self.broken is None and self._lane is not None and frame_id in self._pending:
            self._lane.send(
                FrameHeader(
                    kind=FRAME_KIND_CREDIT, frame_id=frame_id, credit=count, credit_bytes=nbytes
                )
            )

    def feed(self, frame_id: int, payload: bytes) -> None:
        """One more input for a running request (see FRAME_KIND_INPUT)."""
        if self.broken is None and self._lane is not None and frame_id in self._pending:
            self._lane.send(FrameHeader(kind=FRAME_KIND_INPUT, frame_id=frame_id), payload)

    async def _write_loop(self, call: Any, lane: FrameLane) -> None:
        """Write once the replica has confirmed, in its headers, that it is the replica this
        connection is for: until then nothing is written, so nothing can have run."""
        try:
            metadata = tuple(await call.initial_metadata() or ())
            if (REPLICA_ID_METADATA_KEY, self.replica_id) not in metadata:
                return  # refused: the read loop reports the status it ended with
            hello = self._hello
            if hello is not None:
                proof = next((v for k, v in metadata if k == shm.PROOF_METADATA_KEY), None)
                if hello.proven(proof if isinstance(proof, str) else None):
                    lane.writer.segments = self._segments  # ours go there too
            await lane.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A write fails when the stream has ended: its reader reports how (a replica that
            # closed it says what it had read). A stream still alive is ended so it does too.
            call.cancel()

    async def _read_loop(self, call: Any) -> None:
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    code = await call.code()
                    details = await call.details()
                    if code == grpc.StatusCode.OK:
                        raise ConnectionLost(
                            f"Replica at {self.address} closed the connection.",
                            read_upto=_read_upto(await call.trailing_metadata()),
                        )
                    raise ConnectionLost(
                        f"Replica at {self.address} ended the connection: {code.name}: {details}",
                        retryable=code != grpc.StatusCode.UNAUTHENTICATED,
                    )
                self._dispatch(await read_frames(message, call.read, self._segments))
        except asyncio.CancelledError:
            raise
        except FrameError as exc:
            self._fail(ConnectionLost(f"Replica at {self.address} sent a malformed batch: {exc}"))
        except Exception as exc:
            self._fail(_lost(exc, self.address))

    def _dispatch(self, frames: list[tuple[FrameHeader, memoryview, list[bytes] | None]]) -> None:
        pending = self._pending
        for header, body, buffers in frames:
            kind = header.kind
            if kind != FRAME_KIND_ITEM and kind != FRAME_KIND_INPUT_CREDIT:
                self._on_load(header.ongoing, header.acked)
            entry = pending.get(header.frame_id)
            if entry is None:
                continue
            if kind in _TERMINAL:
                del pending[header.frame_id]
            listener, request = entry
            try:
                if kind == FRAME_KIND_RESULT:
                    listener.on_result(request, body, buffers)
                elif kind == FRAME_KIND_ITEM:
                    listener.on_item(request, body, buffers)
                elif kind == FRAME_KIND_END:
                    listener.on_end(request)
                elif kind == FRAME_KIND_ERROR:
                    listener.on_error(
                        request, rebuild(header.error), header.error_kind == ERROR_KIND_CANCELLED
                    )
                elif kind == FRAME_KIND_REJECTED:
                    listener.on_rejected(request, header.reject_reason == REJECT_REASON_DRAINING)
                elif kind == FRAME_KIND_RESERVED:
                    listener.on_reserved(request)
                elif kind == FRAME_KIND_INPUT_CREDIT:
                    listener.on_input_read(request, header.credit, header.credit_bytes)
            except Exception:
                logger.exception("Handling a reply from %s failed", self.address)

    def _fail(self, error: ConnectionLost) -> None:
        """Report every pending request lost and tell the owner (who closes this connection)."""
        if self.broken is not None:
            return
        self.broken = error
        self._remove_segments()
        pending, self._pending = self._pending, {}
        written_upto = self._written_upto
        if error.read_upto is not None:  # a graceful close: later ones never reached it
            written_upto = min(written_upto, error.read_upto)
        for frame_id, (listener, request) in pending.items():
            try:
                listener.on_lost(request, error, frame_id <= written_upto)
            except Exception:
                logger.exception("Reporting a lost connection failed")
        self._on_broken(self, error)

    async def queue_length(self, timeout_s: float) -> tuple[int, bool]:
        """Probe the replica's ongoing count (and whether it accepts work)."""
        if self.broken is not None:
            raise self.broken
        if self._lane is None:
            self._start()
        assert self._channel is not None
        probe = self._channel.unary_unary(
            QUEUE_LENGTH_METHOD,
            request_serializer=QueueLengthRequest.SerializeToString,
            response_deserializer=QueueLengthResponse.FromString,
        )
        try:
            reply = await probe(
                QueueLengthRequest(), timeout=timeout_s, metadata=token_metadata(self._token)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"Probe of {self.address} took over {timeout_s}s.") from exc
            lost = _lost(exc, self.address)
            self._fail(lost)
            raise lost from exc
        return reply.ongoing, reply.accepting

    async def aclose(self) -> None:
        """Close the stream and channel; pending requests are reported lost. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.broken is None:
            self._fail(ConnectionLost(f"Connection to {self.address} was closed."))
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
        self._remove_segments()  # written meanwhile by a replica still sending

    def _remove_segments(self) -> None:
        """Once nothing more is written here: every segment of this stream left in /dev/shm
        (ours never read, the replica's never taken) goes."""
        hello = self._hello
        if hello is not None:
            hello.remove()
            shm.sweep(hello.token)


def _read_upto(metadata: Any) -> int | None:
    for key, value in tuple(metadata or ()):
        if key == ACKED_METADATA_KEY:
            try:
                return int(value)
            except (TypeError, ValueError):
                return None
    return None


def _lost(exc: BaseException, address: str) -> ConnectionLost:
    if isinstance(exc, ConnectionLost):
        return exc
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        return ConnectionLost(
            f"Connection to replica at {address} failed: {code.name}: {exc.details()}",
            retryable=code != grpc.StatusCode.UNAUTHENTICATED,
        )
    return ConnectionLost(f"Connection to replica at {address} failed: {exc!r}")
