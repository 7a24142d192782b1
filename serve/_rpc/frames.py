"""The framing of the multiplexed Connect stream.

One gRPC message is a ``serve.v1.Batch`` whose ``frames`` bytes hold a run of frames::

    u32 header_len | u32 body_len | FrameHeader (protobuf) | body (raw bytes)

The Batch wrapper is written and read by hand (tag 0x0A, varint length) so that payloads are
copied once into the outgoing message and sliced, not copied, out of an incoming one. The result
is byte-for-byte a valid protobuf ``Batch``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

from serve._proto.replica_pb2 import (
    FRAME_KIND_END,
    FRAME_KIND_ITEM,
    FRAME_KIND_REQUEST,
    FRAME_KIND_RESULT,
    FrameHeader,
)
from serve._rpc.shm import SegmentError, SegmentLane
from serve._settings import settings

_LENGTHS: Final = struct.Struct("<II")
_BATCH_TAG: Final = b"\x0a"  # field 1, wire type 2 (length-delimited)
MAX_VARINT_BYTES: Final = 10
MAX_FRAME_BODY: Final = 2**32 - 1  # a frame's body length is a u32
# Out-of-band buffers travel as messages of at most this size: gRPC copies each message whole,
# so a big buffer costs one chunk of extra memory at a time instead of a full copy.
CHUNK_BYTES: Final = 8 * 1024 * 1024


class _Chunk:
    """A slice of an out-of-band buffer, copied into a message only when it is written."""

    __slots__ = ("buffer", "end", "start")

    def __init__(self, buffer: bytes, start: int, end: int) -> None:
        self.buffer, self.start, self.end = buffer, start, end

    def message(self) -> bytes:
        with memoryview(self.buffer) as view:
            return bytes(view[self.start : self.end])


def _message(item: bytes | _Chunk) -> bytes:
    return item if isinstance(item, bytes) else item.message()


class FrameError(ValueError):
    """A Connect message that is not a well-formed batch of frames."""


_SMALL_VARINTS: Final = tuple(bytes((i,)) for i in range(128))


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class BatchWriter:
    """Accumulates frames; :meth:`take` returns the messages to write, in order.

    Usually that is one Batch with every frame. A frame with out-of-band buffers ends its Batch
    and is followed by one raw message per buffer. Each message is marked with the highest frame
    id that is complete once it is written (0: none), so a writer can tell which frames reached
    gRPC whole.
    """

    __slots__ = (
        "_last_frame_id",
        "_max_bytes",
        "_messages",
        "_parts",
        "_size",
        "count",
        "segments",
    )

    def __init__(self, max_bytes: int | None = None) -> None:
        # A Batch never grows past the receiver's message limit: one that would is closed first.
        self._max_bytes = settings().max_message_bytes if max_bytes is None else max_bytes
        self._parts: list[bytes | memoryview] = []
        self._size = 0
        self._last_frame_id = 0  # the highest frame id in the batch being built
        self._messages: list[tuple[bytes | _Chunk, int]] = []
        self.count = 0
        # Set once the stream's handshake proved a shared /dev/shm: big buffers go there.
        self.segments: SegmentLane | None = None

    def add(
        self, header: FrameHeader, *body: bytes | memoryview, buffers: Sequence[bytes] = ()
    ) -> None:
        if buffers:
            header.buffer_lengths.extend(len(b) for b in buffers)
            segments = self.segments
            if segments is not None and segments.min_bytes:
                total = 0
                for buffer in buffers:
                    total += len(buffer)
                if total >= segments.min_bytes:
                    try:
                        header.shm_segment = segments.put(buffers)
                    except OSError:
                        pass  # /dev/shm full or gone: these go over gRPC
                    else:
                        buffers = ()
        self._append(header.SerializeToString(), body)
        if buffers:
            # The frame is complete only with its last buffer: that message carries its frame id.
            last_frame_id = max(self._last_frame_id, header.frame_id)
            self._last_frame_id = 0
            self._close_batch(0)
            for buffer in buffers:
                if len(buffer) <= CHUNK_BYTES:
                    self._messages.append((buffer, 0))
                    continue
                for start in range(0, len(buffer), CHUNK_BYTES):
                    end = min(start + CHUNK_BYTES, len(buffer))
                    self._messages.append((_Chunk(buffer, start, end), 0))
            self._messages[-1] = (self._messages[-1][0], last_frame_id)
        elif header.frame_id > self._last_frame_id:
            self._last_frame_id = header.frame_id

    def add_encoded(
        self,
        encoded: bytes,
        frame_id: int,
        *body: bytes | memoryview,
        buffers: Sequence[bytes] = (),
    ) -> None:
        """Add a frame whose header is already serialized (see :func:`request_header`)."""
        if buffers:  # rare and big: the header gains the buffers' lengths
            self.add(FrameHeader.FromString(encoded), *body, buffers=buffers)
            return
        self._append(encoded, body)
        if frame_id > self._last_frame_id:
            self._last_frame_id = frame_id

    def _append(self, encoded: bytes, body: tuple[bytes | memoryview, ...]) -> None:
        body_len = 0
        for part in body:
            body_len += len(part)
        if body_len > MAX_FRAME_BODY:
            raise FrameError(f"A frame body of {body_len} bytes is over {MAX_FRAME_BODY}.")
        if self._parts and self._size + 8 + len(encoded) + body_len > self._max_bytes - 16:
            self._close_batch()
        parts = self._parts
        parts.append(_LENGTHS.pack(len(encoded), body_len))
        parts.append(encoded)
        parts.extend(body)
        self._size += 8 + len(encoded) + body_len
        self.count += 1

    def _close_batch(self, mark: int | None = None) -> None:
        if self._parts:
            message = b"".join([_BATCH_TAG, _varint(self._size), *self._parts])
            self._messages.append((message, self._last_frame_id if mark is None else mark))
            self._parts, self._size, self._last_frame_id = [], 0, 0

    def take_marked(self) -> list[tuple[bytes | _Chunk, int]]:
        """The messages to write (a chunk becomes one when written), each with the highest
        frame id it completes (0: none)."""
        self._close_batch()
        messages, self._messages = self._messages, []
        self.count = 0
        return messages

    def take(self) -> list[bytes]:
        return [_message(item) for item, _ in self.take_marked()]


BUSY_FRAMES: Final = 2  # a batch of more frames than this means requests overlap: coalesce


class FrameLane:
    """The frames going one way on one gRPC stream, coalesced: whatever is queued when the
    writer is free goes out together. Used by both ends of the Connect stream."""

    __slots__ = ("_busy", "_wakeup", "_write", "idle", "on_written", "writer")

    def __init__(self, write: Callable[[bytes], Awaitable[Any]]) -> None:
        self._write = write
        self.writer = BatchWriter()
        self._wakeup = asyncio.Event()
        self._busy = False  # the last message carried several frames
        self.idle = asyncio.Event()  # nothing queued and nothing being written
        self.idle.set()
        # Called with the highest frame id whose frame gRPC accepted whole: a frame whose write
        # failed (the stream had ended) never reached the peer.
        self.on_written: Callable[[int], None] | None = None

    def send(
        self, header: FrameHeader, *body: bytes | memoryview, buffers: Sequence[bytes] = ()
    ) -> None:
        self.writer.add(header, *body, buffers=buffers)
        self.idle.clear()
        if not self._wakeup.is_set():
            self._wakeup.set()

    def send_encoded(
        self,
        encoded: bytes,
        frame_id: int,
        *body: bytes | memoryview,
        buffers: Sequence[bytes] = (),
    ) -> None:
        """:meth:`send` for a header already serialized (the per-request hot path)."""
        self.writer.add_encoded(encoded, frame_id, *body, buffers=buffers)
        self.idle.clear()
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def run(self) -> None:
        """Write until cancelled (or until a write fails, which raises).

        Under load (the last message carried several frames) the writer lets one more loop
        turn pass before it takes the batch: the requests whose tasks run in that turn join
        it, and a gRPC message costs far more than a frame. A lone request is never held."""
        while True:
            await self._wakeup.wait()
            if self._busy:
                await asyncio.sleep(0)
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        writer = self.writer
        while writer.count:
            self._busy = writer.count > BUSY_FRAMES
            for item, completes in writer.take_marked():
                await self._write(_message(item))
                if completes and self.on_written is not None:
                    self.on_written(completes)
        self.idle.set()


# Hand-serialized headers for the frames every request costs. Protobuf's wire format is a run
# of (tag, value) pairs, and concatenated messages parse as one: a request's header is the
# serialized fields its handle options fix (cached) followed by its own fields, written here.
# tests/unit/test_frames.py checks them against FrameHeader's own serialization.
_FRAME_ID_TAG: Final = b"\x10"  # frame_id = 2, varint
_ARGS_LEN_TAG: Final = b"\x30"  # args_len = 6, varint
_REQUEST_ID_TAG: Final = b"\x52"  # request_id = 10, length-delimited
_ONGOING_TAG: Final = b"\x60"  # ongoing = 12, varint
_ARGS_BUFFER_COUNT_TAG: Final = b"\x90\x01"  # args_buffer_count = 18, varint
_ACKED_TAG: Final = b"\x98\x01"  # acked = 19, varint
_TIMEOUT_TAG: Final = b"\xb1\x01"  # timeout_s = 22, fixed64 (double)
_RESERVED_TRUE: Final = b"\xb8\x01\x01"  # reserved = 23, true
_DOUBLE: Final = struct.Struct("<d")
_prefixes: dict[tuple[Any, ...], bytes] = {}
_MAX_PREFIXES: Final = 4096


def request_header(
    frame_id: int,
    options: tuple[str, int, int, str, bool, bool, int, int],
    *,
    request_id: str,
    args_len: int,
    args_buffer_count: int = 0,
    timeout_s: float = 0.0,
    reserved: bool = False,
    trace_context: dict[str, str] | None = None,
) -> bytes:
    """A REQUEST frame's serialized header. ``options``: (method, request codec, response
    codec, model id, stream, no_reject, stream window, stream window bytes), the fields a
    handle's options fix, serialized once per distinct value."""
    prefix = _prefixes.get(options)
    if prefix is None:
        method, request_codec, response_codec, model_id, stream, no_reject, window, window_bytes = (
            options
        )
        prefix = FrameHeader(
            kind=FRAME_KIND_REQUEST,
            method=method,
            request_codec=request_codec,  # type: ignore[arg-type]
            response_codec=response_codec,  # type: ignore[arg-type]
            model_id=model_id,
            stream=stream,
            no_reject=no_reject,
            stream_window=window,
            stream_window_bytes=window_bytes,
        ).SerializeToString()
        if len(_prefixes) >= _MAX_PREFIXES:
            _prefixes.clear()
        _prefixes[options] = prefix
    rid = request_id.encode()
    parts = [prefix, _FRAME_ID_TAG, _varint(frame_id), _REQUEST_ID_TAG, _varint(len(rid)), rid]
    if args_len:
        parts += (_ARGS_LEN_TAG, _varint(args_len))
    if args_buffer_count:
        parts += (_ARGS_BUFFER_COUNT_TAG, _varint(args_buffer_count))
    if timeout_s:
        parts += (_TIMEOUT_TAG, _DOUBLE.pack(timeout_s))
    if reserved:
        parts.append(_RESERVED_TRUE)
    if trace_context:
        parts.append(FrameHeader(trace_context=trace_context).SerializeToString())
    return b"".join(parts)


_RESULT_KIND: Final = b"\x08" + bytes((FRAME_KIND_RESULT,))
_END_KIND: Final = b"\x08" + bytes((FRAME_KIND_END,))
_ITEM_KIND: Final = b"\x08" + bytes((FRAME_KIND_ITEM,))


def outcome_header(frame_id: int, ongoing: int, acked: int, *, end: bool = False) -> bytes:
    """A RESULT (or, with ``end``, END) frame's serialized header, with the replica's load."""
    return b"".join(
        (
            _END_KIND if end else _RESULT_KIND,
            _FRAME_ID_TAG,
            _varint(frame_id),
            _ONGOING_TAG,
            _varint(ongoing),
            _ACKED_TAG,
            _varint(acked),
        )
    )


def item_header(frame_id: int) -> bytes:
    """An ITEM frame's serialized header."""
    return _ITEM_KIND + _FRAME_ID_TAG + _varint(frame_id)


def iter_frames(message: bytes) -> Iterator[tuple[FrameHeader, memoryview]]:
    """Yield (header, body) for each frame; bodies are zero-copy views of ``message``."""
    view = memoryview(message)
    total = len(view)
    if total == 0:
        return
    if view[0] != 0x0A:
        raise FrameError(f"Not a Batch message: first byte is {view[0]:#04x}, expected 0x0a.")
    length = shift = 0
    offset = 1
    while True:
        if offset >= total or offset > MAX_VARINT_BYTES:
            raise FrameError("Truncated Batch length prefix.")
        byte = view[offset]
        offset += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    end = offset + length
    if end != total:
        raise FrameError(f"Batch length {length} does not match the message ({total - offset}).")
    while offset < end:
        if end - offset < 8:
            raise FrameError("Truncated frame lengths.")
        header_len, body_len = _LENGTHS.unpack_from(view, offset)
        offset += 8
        body_start = offset + header_len
        body_end = body_start + body_len
        if body_end > end:
            raise FrameError(
                f"Frame of {header_len}+{body_len} bytes overruns the batch ({end - offset} left)."
            )
        try:
            header = FrameHeader.FromString(view[offset:body_start])  # type: ignore[arg-type]
        except Exception as exc:  # protobuf's DecodeError
            raise FrameError(f"Undecodable frame header: {exc}") from exc
        yield header, view[body_start:body_end]
        offset = body_end


async def _read_buffer(read: Callable[[], Awaitable[object]], expected: int) -> bytes:
    """One out-of-band buffer: the messages carrying its chunks, joined once."""
    parts: list[bytes] = []
    received = 0
    while received < expected:
        data = await read()
        if not isinstance(data, bytes):
            raise FrameError("The stream ended before a frame's out-of-band buffers.")
        parts.append(data)
        received += len(data)
    if received != expected:
        raise FrameError(f"An out-of-band buffer of {received} bytes was announced as {expected}.")
    return parts[0] if len(parts) == 1 else b"".join(parts)


# A segment this big is read on a worker thread, so the loop serves others meanwhile.
_THREAD_READ_BYTES: Final = 4 * 1024 * 1024


async def _take_segment(segments: SegmentLane | None, header: FrameHeader) -> list[bytes]:
    number = header.shm_segment
    if segments is None:
        raise FrameError("A frame names a shared-memory segment on a stream without them.")
    lengths = list(header.buffer_lengths)
    try:
        if sum(lengths) >= _THREAD_READ_BYTES:
            return await asyncio.to_thread(segments.take, number, lengths)
        return segments.take(number, lengths)
    except SegmentError as exc:
        raise FrameError(str(exc)) from exc
    except asyncio.CancelledError:
        segments.discard(number)
        raise


async def read_frames(
    message: bytes,
    read: Callable[[], Awaitable[object]],
    segments: SegmentLane | None = None,
) -> list[tuple[FrameHeader, memoryview, list[bytes] | None]]:
    """The frames of one Batch, each with its out-of-band buffers (read with ``read``, or
    from the peer's shared-memory ``segments``)."""
    frames = list(iter_frames(message))
    out: list[tuple[FrameHeader, memoryview, list[bytes] | None]] = []
    last = len(frames) - 1
    for i, (header, body) in enumerate(frames):
        buffers: list[bytes] | None = None
        if header.shm_segment:
            buffers = await _take_segment(segments, header)
        elif header.buffer_lengths:
            if i != last:
                raise FrameError("A frame with out-of-band buffers must be the last of its batch.")
            buffers = []
            for expected in header.buffer_lengths:
                buffers.append(await _read_buffer(read, expected))
        out.append((header, body, buffers))
    return out
