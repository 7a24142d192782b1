"""The router side of a replica's multiplexed Connect stream.

One ``ReplicaConnection`` per replica per process carries every request of every router in the
process to that replica. Requests are numbered per connection; replies are matched by number and
reported to the request's :class:`Exchange` as plain values (no protobuf leaves this module).
Writes are coalesced: whatever is queued when the writer is free goes out as one message.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import grpc.aio

from serve._proto.replica_pb2 import (
    ERROR_KIND_CANCELLED,
    ERROR_KIND_USER,
    FRAME_KIND_ACCEPTED,
    FRAME_KIND_CANCEL,
    FRAME_KIND_CREDIT,
    FRAME_KIND_END,
    FRAME_KIND_ERROR,
    FRAME_KIND_ITEM,
    FRAME_KIND_REJECTED,
    FRAME_KIND_REQUEST,
    FRAME_KIND_RESULT,
    REJECT_REASON_DRAINING,
    FrameHeader,
    QueueLengthRequest,
    QueueLengthResponse,
    ResultsRequest,
)
from serve._rpc.channel import TlsFiles, open_channel, token_metadata
from serve._rpc.frames import BatchWriter, FrameError, read_frames
from serve._rpc.status import rebuild
from serve._settings import SESSION_METADATA_KEY

logger = logging.getLogger(__name__)

CONNECT_METHOD = "/serve.v1.Replica/Connect"
RESULTS_METHOD = "/serve.v1.Replica/Results"
QUEUE_LENGTH_METHOD = "/serve.v1.Replica/QueueLength"


class ConnectionLost(Exception):
    """The stream to a replica broke. ``retryable`` is False when retrying cannot help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Exchange(Protocol):
    """What a connection reports about one request it carries (called on the home loop)."""

    def on_accepted(self, ongoing: int) -> None: ...
    def on_rejected(self, ongoing: int, draining: bool) -> None: ...
    def on_result(self, body: memoryview, ongoing: int, buffers: list[bytes] | None) -> None: ...
    def on_error(self, error: BaseException, cancelled: bool, user: bool, ongoing: int) -> None: ...
    def on_item(self, body: memoryview, buffers: list[bytes] | None) -> None: ...
    def on_end(self, ongoing: int) -> None: ...
    def on_lost(self, error: ConnectionLost) -> None: ...


_TERMINAL = frozenset({FRAME_KIND_REJECTED, FRAME_KIND_RESULT, FRAME_KIND_ERROR, FRAME_KIND_END})


class ReplicaConnection:
    """One Connect stream to one replica; opened on first use, never reopened once broken."""

    def __init__(
        self,
        replica_id: str,
        address: str,
        *,
        token: str | None,
        tls: TlsFiles | None,
        on_broken: Callable[[ReplicaConnection, ConnectionLost], None],
    ) -> None:
        self.replica_id = replica_id
        self.address = address
        self._token = token
        self._tls = tls
        self._on_broken = on_broken
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None
        self._results: grpc.aio.UnaryStreamCall[ResultsRequest, bytes] | None = None
        self._writer = BatchWriter()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, Exchange] = {}
        self._next_id = 0
        self.broken: ConnectionLost | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "broken" if self.broken else "closed" if self._closed else "open"
        return (
            f"ReplicaConnection({self.replica_id!r}, {self.address}, {state}, "
            f"pending={len(self._pending)})"
        )

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def _start(self) -> None:
        """Open the session: Connect (requests in, admission out) and Results (outcomes)."""
        self._channel = open_channel(self.address, self._tls)
        session = os.urandom(8).hex()
        connect: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self._channel.stream_stream(
            CONNECT_METHOD
        )
        self._call = connect(
            metadata=(*token_metadata(self._token), (SESSION_METADATA_KEY, session))
        )
        results: grpc.aio.UnaryStreamMultiCallable[ResultsRequest, bytes] = (
            self._channel.unary_stream(
                RESULTS_METHOD, request_serializer=ResultsRequest.SerializeToString
            )
        )
        self._results = results(
            ResultsRequest(session=session), metadata=token_metadata(self._token)
        )
        self._wakeup = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name=f"conn:write:{self.replica_id}"),
            asyncio.create_task(self._read_loop(self._call), name=f"conn:read:{self.replica_id}"),
            asyncio.create_task(
                self._read_loop(self._results), name=f"conn:results:{self.replica_id}"
            ),
        ]

    def send_request(
        self,
        exchange: Exchange,
        *,
        method: str,
        request_codec: int,
        response_codec: int,
        args: bytes,
        kwargs: bytes,
        request_id: str,
        model_id: str = "",
        stream: bool = False,
        no_reject: bool = False,
        stream_window: int = 0,
        buffers: list[bytes] | None = None,
        args_buffer_count: int = 0,
    ) -> int:
        """Queue a request frame; returns its number on this connection."""
        if self.broken is not None:
            raise self.broken
        if self._call is None:
            self._start()
        self._next_id += 1
        frame_id = self._next_id
        self._pending[frame_id] = exchange
        self._writer.add(
            FrameHeader(
                kind=FRAME_KIND_REQUEST,
                id=frame_id,
                method=method,
                request_codec=request_codec,  # type: ignore[arg-type]
                response_codec=response_codec,  # type: ignore[arg-type]
                args_len=len(args),
                model_id=model_id,
                stream=stream,
                no_reject=no_reject,
                request_id=request_id,
                stream_window=stream_window,
                args_buffer_count=args_buffer_count,
            ),
            args,
            kwargs,
            buffers=buffers or (),
        )
        self._kick()
        return frame_id

    def cancel(self, frame_id: int) -> None:
        """Ask the replica to cancel a request; its reply still arrives (ERROR, cancelled)."""
        if self.broken is None and frame_id in self._pending:
            self._writer.add(FrameHeader(kind=FRAME_KIND_CANCEL, id=frame_id))
            self._kick()

    def forget(self, frame_id: int) -> None:
        """Stop reporting replies of a request (its caller is gone)."""
        self._pending.pop(frame_id, None)

    def credit(self, frame_id: int, count: int) -> None:
        if self.broken is None and frame_id in self._pending:
            self._writer.add(FrameHeader(kind=FRAME_KIND_CREDIT, id=frame_id, credit=count))
            self._kick()

    def _kick(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.is_set():
            wakeup.set()

    async def _write_loop(self) -> None:
        assert self._call is not None
        assert self._wakeup is not None
        call, wakeup, writer = self._call, self._wakeup, self._writer
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                while writer.count:
                    for message in writer.take():
                        await call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail(_lost(exc, self.address))

    async def _read_loop(self, call: Any) -> None:
        """Dispatch what one of the session's two streams brings (either order is fine: an
        outcome arriving before its admission answer implies it)."""
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    code = await call.code()
                    details = await call.details()
                    if code == grpc.StatusCode.OK:
                        raise ConnectionLost(f"Replica at {self.address} closed the connection.")
                    raise ConnectionLost(
                        f"Replica at {self.address} ended the connection: {code.name}: {details}",
                        retryable=code != grpc.StatusCode.UNAUTHENTICATED,
                    )
                self._dispatch(await read_frames(message, call.read))
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
            frame_id = header.id
            exchange = pending.get(frame_id)
            if exchange is None:
                continue
            if kind in _TERMINAL:
                del pending[frame_id]
            try:
                if kind == FRAME_KIND_RESULT:
                    exchange.on_result(body, header.ongoing, buffers)
                elif kind == FRAME_KIND_ACCEPTED:
                    exchange.on_accepted(header.ongoing)
                elif kind == FRAME_KIND_ITEM:
                    exchange.on_item(body, buffers)
                elif kind == FRAME_KIND_END:
                    exchange.on_end(header.ongoing)
                elif kind == FRAME_KIND_ERROR:
                    error = rebuild(header.error)
                    exchange.on_error(
                        error,
                        header.error_kind == ERROR_KIND_CANCELLED,
                        header.error_kind == ERROR_KIND_USER,
                        header.ongoing,
                    )
                elif kind == FRAME_KIND_REJECTED:
                    exchange.on_rejected(
                        header.ongoing, header.reject_reason == REJECT_REASON_DRAINING
                    )
            except Exception:
                logger.exception("Handling a reply from %s failed", self.address)

    def _fail(self, error: ConnectionLost) -> None:
        """Report every pending request lost and tell the owner (who closes this connection)."""
        if self.broken is not None:
            return
        self.broken = error
        pending, self._pending = self._pending, {}
        for exchange in pending.values():
            try:
                exchange.on_lost(error)
            except Exception:
                logger.exception("Reporting a lost connection failed")
        self._on_broken(self, error)

    async def queue_length(self, timeout_s: float) -> tuple[int, bool]:
        """Probe the replica's ongoing count (and whether it accepts work)."""
        if self.broken is not None:
            raise self.broken
        if self._call is None:
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
                raise TimeoutError(f"Probe of {self.address} took over {timeout_s}s.") from None
            lost = _lost(exc, self.address)
            self._fail(lost)
            raise lost from None
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
        for call in (self._call, self._results):
            if call is not None:
                call.cancel()
        if self._channel is not None:
            await self._channel.close()


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
