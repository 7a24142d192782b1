"""One router process's Connect stream: requests in, exactly one answer per request out.

Admission is implicit. A request is answered REJECTED (full or draining) before any user code
runs, or with its outcome: RESULT, ERROR, or ITEMs followed by END or ERROR. Whatever user code
does (raise any ``BaseException``, cancel itself, return something that cannot be encoded), an
admitted request gets exactly one outcome, unless the stream itself is gone.

A slot may be held ahead of its request (RESERVE, for ``handle.choose_replica()``): it counts as
ongoing, and the REQUEST sent in it later (``reserved``, same frame id) is never rejected. An
unused slot is given back by RELEASE, or when the stream ends.

Every reply carries the replica's ongoing count and the highest frame id read so far
(``acked``), which the router's queue-length estimate needs.

A request may carry a time budget (``timeout_s``): its deadline is that much after it arrived,
by this replica's monotonic clock. Nested calls made while serving it inherit the deadline. When
it passes, those still in flight fail with ``RequestTimeoutError``, the user's code is cancelled
(a sync method's thread cannot be, and keeps its slot until it returns), and the answer is
``RequestTimeoutError`` whatever the code does afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import grpc
import grpc.aio

from replica.executor import Executor
from replica.feed import InputFeed
from serve import _tracing
from serve._context import RequestContext
from serve._ingress import ASGI_METHOD, FED_METHODS
from serve._logging import access_log
from serve._proto.replica_pb2 import (
    ERROR_KIND_CANCELLED,
    ERROR_KIND_SYSTEM,
    ERROR_KIND_USER,
    FRAME_KIND_CANCEL,
    FRAME_KIND_CREDIT,
    FRAME_KIND_END,
    FRAME_KIND_ERROR,
    FRAME_KIND_INPUT,
    FRAME_KIND_INPUT_CREDIT,
    FRAME_KIND_ITEM,
    FRAME_KIND_REJECTED,
    FRAME_KIND_RELEASE,
    FRAME_KIND_REQUEST,
    FRAME_KIND_RESERVE,
    FRAME_KIND_RESERVED,
    FRAME_KIND_RESULT,
    REJECT_REASON_DRAINING,
    REJECT_REASON_FULL,
    FrameHeader,
)
from serve._rpc import shm
from serve._rpc.channel import Context
from serve._rpc.frames import (
    FrameError,
    FrameLane,
    item_header,
    outcome_header,
    read_frames,
)
from serve._rpc.status import error_info
from serve._serialization import Unencodable, decode_args, encode_buffers
from serve._settings import settings
from serve.exceptions import RemoteError, RequestTimeoutError, ServeError

logger = logging.getLogger(__name__)

SEGMENT_LINGER_S = 2.0  # a live router's time to take the last segments of a closing stream
DEFAULT_STREAM_WINDOW = 64
DEFAULT_STREAM_WINDOW_BYTES = 16 * 1024 * 1024
# A budget above this (or not a positive number) is no deadline at all: timers cannot hold it.
MAX_TIMEOUT_S = 1e7

Reply = tuple[FrameHeader, tuple[bytes, ...], list[bytes]]  # header, body parts, buffers


# The common outcomes, as markers: their headers are serialized by outcome_header(), with the
# request's frame id and the replica's load (an error's header is a FrameHeader of its own).
_RESULT = FrameHeader(kind=FRAME_KIND_RESULT)
_END = FrameHeader(kind=FRAME_KIND_END)


class _SystemError(Exception):
    """The request could not be run at all (bad payload, unknown method)."""


class StreamSession:
    """The requests of one Connect stream, their tasks, and the lane their answers go on."""

    def __init__(self, executor: Executor, context: Context, shm_token: str = "") -> None:
        """``shm_token``: the stream's shared-memory token, when the router proved it shares
        this host's /dev/shm (serve/_rpc/shm.py); its segments are removed when it ends."""
        self._executor = executor
        self._context = context
        self._lane = FrameLane(context.write)
        self._segments: shm.SegmentLane | None = None
        if shm_token:
            self._segments = self._lane.writer.segments = shm.SegmentLane(
                shm_token, router=False, min_bytes=settings().shm_min_bytes
            )
        self._acked = 0  # the highest frame id read
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cancel_requested: set[int] = set()
        # Requests holding an admission slot. The slot is released by the request's own code,
        # or by its task's done-callback if the task was cancelled before it ever ran.
        self._holding: set[int] = set()
        # Slots held by RESERVE for a request to come (handle.choose_replica); released by the
        # REQUEST that uses it, by RELEASE, or when the stream ends.
        self._reservations: set[int] = set()
        self._credits: dict[int, list[int]] = {}  # stream -> [items, bytes] it may still send
        self._credit_events: dict[int, asyncio.Event] = {}
        self._contexts: dict[int, RequestContext] = {}  # of the requests running now
        self._feeds: dict[int, InputFeed] = {}  # inputs of running ingress requests
        self._deadline_timers: dict[int, asyncio.TimerHandle] = {}
        self._timed_out: dict[int, RequestTimeoutError] = {}  # deadline passed, not answered
        self._max_bytes = settings().max_message_bytes
        self._closing = False

    async def run(self) -> None:
        writer = asyncio.create_task(self._lane.run(), name="replica:conn:write")
        try:
            while True:
                message = await self._context.read()
                if message is grpc.aio.EOF:
                    break
                frames = await read_frames(message, self._context.read, self._segments)
                for header, body, buffers in frames:
                    self._on_frame(header, body, buffers)
            # The router half-closed: finish what it sent, then end the stream.
            while self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._lane.flush()
        except FrameError as exc:
            await self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed batch: {exc}")
        finally:
            self._closing = True
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in self._reservations:
                self._executor.release()
            self._reservations.clear()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if self._segments is not None:  # the router's segments nobody will read now
                self._segments.sweep(own=False)

    @property
    def acked(self) -> int:
        """The highest frame id read on this stream."""
        return self._acked

    async def remove_segments(self, router_alive: bool) -> None:
        """After :meth:`run`: remove this stream's shared-memory segments. A router still
        alive (the replica closed the stream, or the router half-closed it) may still read the
        last results: it gets a moment to take them first."""
        segments = self._segments
        if segments is not None:
            if router_alive:
                await segments.linger(SEGMENT_LINGER_S)
            segments.sweep()

    async def wait_flushed(self) -> None:
        """Until everything queued for the router has been written (before closing)."""
        await self._lane.idle.wait()

    def _send(
        self, header: FrameHeader, *body: bytes | memoryview, buffers: list[bytes] | None = None
    ) -> None:
        if header.kind != FRAME_KIND_ITEM and header.kind != FRAME_KIND_INPUT_CREDIT:
            header.ongoing = self._executor.ongoing
            header.acked = self._acked
        self._lane.send(header, *body, buffers=buffers or ())

    def _on_frame(self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None) -> None:
        kind = header.kind
        if kind == FRAME_KIND_REQUEST:
            if header.frame_id > self._acked:
                self._acked = header.frame_id
            self._on_request(header, body, buffers)
        elif kind == FRAME_KIND_CANCEL:
            self._cancel(header.frame_id)
        elif kind == FRAME_KIND_INPUT:
            feed = self._feeds.get(header.frame_id)
            if feed is not None:  # else rejected or finished: the router re-feeds or is done
                feed.put(body)
        elif kind == FRAME_KIND_CREDIT:
            credit = self._credits.get(header.frame_id)
            if credit is not None:
                credit[0] += header.credit
                credit[1] += header.credit_bytes
                self._credit_events[header.frame_id].set()
        elif kind == FRAME_KIND_RESERVE:
            if header.frame_id > self._acked:
                self._acked = header.frame_id
            self._on_reserve(header.frame_id)
        elif kind == FRAME_KIND_RELEASE:
            if header.frame_id in self._reservations:
                self._reservations.discard(header.frame_id)
                self._executor.release()
        else:
            raise FrameError(f"Unexpected frame kind {kind} from a router.")

    def _on_request(
        self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None
    ) -> None:
        executor = self._executor
        frame_id = header.frame_id
        if header.reserved and frame_id in self._reservations:
            # Its slot is already held (even while draining: it was promised before).
            self._reservations.discard(frame_id)
            admitted = True
        elif executor.draining:
            self._reject(frame_id, REJECT_REASON_DRAINING)
            return
        else:
            admitted = header.no_reject or executor.admit()
        if not admitted:
            self._reject(frame_id, REJECT_REASON_FULL)
            return
        timeout_s = header.timeout_s
        deadline_s = 0.0
        if 0.0 < timeout_s <= MAX_TIMEOUT_S:  # False for NaN too
            deadline_s = time.monotonic() + timeout_s
        if header.no_reject and not header.reserved:
            task = asyncio.create_task(
                self._wait_then_run(header, body, buffers, deadline_s), name="replica:broadcast"
            )
        else:
            self._holding.add(frame_id)
            task = asyncio.create_task(
                self._run(header, body, buffers, deadline_s), name=f"replica:{header.method}"
            )
        self._tasks[frame_id] = task
        if header.method in FED_METHODS:
            self._feeds[frame_id] = InputFeed(
                functools.partial(self._input_read, frame_id),
                functools.partial(self._cancel, frame_id),
            )
        task.add_done_callback(functools.partial(self._on_task_done, frame_id))
        if deadline_s:
            self._deadline_timers[frame_id] = asyncio.get_running_loop().call_later(
                timeout_s, self._on_deadline, frame_id, header
            )

    def _cancel(self, frame_id: int) -> None:
        task = self._tasks.get(frame_id)
        if task is not None:
            self._cancel_requested.add(frame_id)
            task.cancel()  # a task that has not started yet ends in _on_task_done
            # Its children are cancelled now, even if its code catches the cancellation.
            self._cancel_children(frame_id)

    def _input_read(self, frame_id: int, count: int, nbytes: int) -> None:
        if not self._closing:
            self._send(
                FrameHeader(
                    kind=FRAME_KIND_INPUT_CREDIT,
                    frame_id=frame_id,
                    credit=count,
                    credit_bytes=nbytes,
                )
            )

    def _on_reserve(self, frame_id: int) -> None:
        if self._executor.draining:
            self._reject(frame_id, REJECT_REASON_DRAINING)
        elif frame_id in self._reservations or frame_id in self._tasks:
            raise FrameError(f"Frame id {frame_id} is already in use on this stream.")
        elif self._executor.admit():
            self._reservations.add(frame_id)
            self._send(FrameHeader(kind=FRAME_KIND_RESERVED, frame_id=frame_id))
        else:
            self._reject(frame_id, REJECT_REASON_FULL)

    def _reject(self, frame_id: int, reason: int) -> None:
        self._send(
            FrameHeader(
                kind=FRAME_KIND_REJECTED,
                frame_id=frame_id,
                reject_reason=reason,  # type: ignore[arg-type]
            )
        )

    def _on_task_done(self, frame_id: int, task: asyncio.Task[None]) -> None:
        """Every request ends here, whether or not its coroutine ever ran."""
        self._tasks.pop(frame_id, None)
        feed = self._feeds.pop(frame_id, None)
        if feed is not None:
            feed.close()
        cancelled = frame_id in self._cancel_requested
        self._cancel_requested.discard(frame_id)
        timed_out = None
        if self._deadline_timers or self._timed_out:
            timer = self._deadline_timers.pop(frame_id, None)
            if timer is not None:
                timer.cancel()
            timed_out = self._timed_out.pop(frame_id, None)
        if frame_id in self._holding:  # cancelled before it started: _run never released
            self._holding.discard(frame_id)
            self._executor.release()
            if timed_out is not None and not self._closing:
                self._send(_error(frame_id, timed_out, ERROR_KIND_SYSTEM))
            elif cancelled and not self._closing:
                self._send(_error(frame_id, asyncio.CancelledError(), ERROR_KIND_CANCELLED))
        elif cancelled and not self._closing and task.cancelled():
            # A broadcast call cancelled while it waited for a slot: it still gets an answer.
            self._send(_error(frame_id, asyncio.CancelledError(), ERROR_KIND_CANCELLED))

    async def _wait_then_run(
        self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None, deadline_s: float
    ) -> None:
        """Broadcast calls wait for a slot instead of being rejected."""
        await self._executor.wait_admitted()
        self._holding.add(header.frame_id)
        await self._run(header, body, buffers, deadline_s)

    async def _run(
        self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None, deadline_s: float
    ) -> None:
        """Run one admitted request and send its outcome; releases its slot exactly once."""
        executor = self._executor
        frame_id = header.frame_id
        request = RequestContext(
            request_id=header.request_id,
            app_name=executor.app_name,
            deployment=executor.deployment,
            method=header.method,
            multiplexed_model_id=header.model_id,
            feed=self._feeds.get(frame_id),
            deadline_s=deadline_s,
        )
        self._contexts[frame_id] = request
        reply: Reply | None = None
        started = time.perf_counter()
        try:
            if deadline_s and time.monotonic() >= deadline_s:
                # Its budget was spent before it could start: no user code runs.
                timed_out = self._timed_out.setdefault(frame_id, self._timeout_error(header))
                reply = (_error(frame_id, timed_out, ERROR_KIND_SYSTEM), (), [])
            else:
                reply = await self._outcome(header, body, buffers, request)
        except asyncio.CancelledError:
            if self._closing or (
                frame_id not in self._cancel_requested and frame_id not in self._timed_out
            ):
                raise  # the stream is gone: nobody to answer
            reply = (_error(frame_id, asyncio.CancelledError(), ERROR_KIND_CANCELLED), (), [])
        finally:
            self._contexts.pop(frame_id, None)
            self._holding.discard(frame_id)
            executor.release()
            self._cancel_requested.discard(frame_id)
            if request.trace is not None:
                _tracing.end_replica(request, reply[0] if reply is not None else None)
            if reply is not None:
                if deadline_s:
                    # Past its deadline the answer is the timeout, whatever the code did since.
                    expired = self._timed_out.get(frame_id)
                    if expired is not None:
                        reply = (_error(frame_id, expired, ERROR_KIND_SYSTEM), (), [])
                self._finish(header, reply, started)

    def _timeout_error(self, header: FrameHeader) -> RequestTimeoutError:
        return RequestTimeoutError(
            deployment=str(self._executor.replica_id.deployment_id),
            method=header.method,
            timeout_s=header.timeout_s,
        )

    def _on_deadline(self, frame_id: int, header: FrameHeader) -> None:
        """A request's deadline passed: its nested calls fail, then its code is cancelled."""
        self._deadline_timers.pop(frame_id, None)
        task = self._tasks.get(frame_id)
        if task is None or task.done():
            return
        self._timed_out[frame_id] = self._timeout_error(header)
        request = self._contexts.get(frame_id)
        if request is not None:
            for child in list(request.children):
                child.expire()
        # Cancel one loop turn later, so that code awaiting a nested call sees that call's
        # RequestTimeoutError (and may clean up) rather than a bare CancelledError.
        asyncio.get_running_loop().call_soon(task.cancel)

    async def _outcome(
        self,
        header: FrameHeader,
        body: memoryview,
        buffers: list[bytes] | None,
        request: RequestContext,
    ) -> Reply:
        """The answer to one request, whatever its code does (cancellation aside)."""
        frame_id = header.frame_id
        executor = self._executor
        try:
            try:
                args, kwargs = decode_args(
                    header.request_codec,
                    body[: header.args_len],
                    body[header.args_len :],
                    buffers,
                    header.args_buffer_count,
                )
            except Exception as exc:
                raise _SystemError(f"Could not decode the request arguments: {exc}") from exc
            if _tracing.enabled:
                _tracing.start_replica(
                    request,
                    header.trace_context,
                    header.method,
                    args,
                    executor.replica_id.unique_id,
                    header.stream,
                )
            try:
                executor.resolve(header.method)
            except ServeError as exc:
                raise _SystemError(str(exc)) from exc
            if header.stream:
                await self._run_stream(header, args, kwargs, request)
                return _END, (), []
            value = await executor.call(header.method, args, kwargs, request)
            payload, reply_buffers = _encode(header.response_codec, value, "result")
            return _RESULT, (payload,), reply_buffers
        except asyncio.CancelledError:
            if frame_id in self._cancel_requested or frame_id in self._timed_out or self._closing:
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # User code let a CancelledError of its own escape (an inner task was cancelled, or
            # a sync method raised concurrent.futures.CancelledError): the request was
            # cancelled inside the replica, and its caller hears so.
            return _error(frame_id, asyncio.CancelledError(), ERROR_KIND_CANCELLED), (), []
        except _SystemError as exc:
            return _error(frame_id, ServeError(str(exc)), ERROR_KIND_SYSTEM), (), []
        except Unencodable as exc:
            return _error(frame_id, TypeError(str(exc)), ERROR_KIND_USER), (), []
        except Exception as exc:
            return _error(frame_id, exc, ERROR_KIND_USER), (), []
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, custom BaseExceptions
            wrapped = RemoteError(type(exc).__name__, _describe(exc), error_info(exc).traceback)
            return _error(frame_id, wrapped, ERROR_KIND_USER), (), []

    def _finish(self, header: FrameHeader, reply: Reply, started: float) -> None:
        header_out, body, reply_buffers = reply
        size = 0
        for part in body:
            size += len(part)
        for buffer in reply_buffers:
            size += len(buffer)
        if size > self._max_bytes:
            header_out = _error(
                header.frame_id, _too_big(header.method, "result", size), ERROR_KIND_USER
            )
            body, reply_buffers = (), []
        if header_out is _RESULT or header_out is _END:  # the common answers, serialized here
            self._lane.send_encoded(
                outcome_header(
                    header.frame_id, self._executor.ongoing, self._acked, end=header_out is _END
                ),
                header.frame_id,
                *body,
                buffers=reply_buffers,
            )
        else:
            self._send(header_out, *body, buffers=reply_buffers)
        executor = self._executor
        duration_ms = (time.perf_counter() - started) * 1000.0
        failed = header_out.kind == FRAME_KIND_ERROR
        cancelled = failed and header_out.error_kind == ERROR_KIND_CANCELLED
        executor.stats.record(duration_ms, error=failed and not cancelled)
        log = access_log()
        if log is not None and executor.access_log:
            outcome = "CANCELLED" if cancelled else "ERROR" if failed else "OK"
            log.record(header.request_id, header.method, outcome, duration_ms)

    async def _run_stream(
        self, header: FrameHeader, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> None:
        """Send each item as it is produced, while the router's credit covers it in items and in
        bytes, so what is in flight never exceeds the window; an item larger than the whole
        window goes alone, once nothing else is in flight."""
        frame_id = header.frame_id
        window_bytes = header.stream_window_bytes or DEFAULT_STREAM_WINDOW_BYTES
        credit = self._credits[frame_id] = [
            header.stream_window or DEFAULT_STREAM_WINDOW,
            window_bytes,
        ]
        event = self._credit_events[frame_id] = asyncio.Event()
        codec = header.response_codec

        async def emit(item: Any) -> None:
            payload, item_buffers = _encode(codec, item, "stream item")
            size = len(payload) + sum(len(b) for b in item_buffers)
            if size > self._max_bytes:
                raise Unencodable(str(_too_big(header.method, "stream item", size)))
            while credit[0] <= 0 or credit[1] < min(size, window_bytes):
                event.clear()
                await event.wait()
            credit[0] -= 1
            credit[1] -= size
            self._lane.send_encoded(item_header(frame_id), frame_id, payload, buffers=item_buffers)

        try:
            if header.method == ASGI_METHOD:  # the app pushes what it sends
                await self._executor.serve_asgi(args, kwargs, request, emit)
            else:
                async for item in self._executor.stream(header.method, args, kwargs, request):
                    await emit(item)
        finally:
            del self._credits[frame_id]
            del self._credit_events[frame_id]

    def _cancel_children(self, frame_id: int) -> None:
        request = self._contexts.get(frame_id)
        if request is not None:
            for child in list(request.children):
                child.cancel()


def _encode(codec: int, value: Any, what: str) -> tuple[bytes, list[bytes]]:
    """Encode a user value; anything its own ``__reduce__`` raises becomes Unencodable."""
    try:
        return encode_buffers(codec, value)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        raise Unencodable(f"Could not encode the {what}: {_describe(exc)}") from exc


def _too_big(method: str, what: str, size: int) -> ValueError:
    limit = settings().max_message_bytes
    return ValueError(
        f"A {what} of {method!r} is {size} bytes, over the {limit}-byte message limit "
        "(SERVE_MAX_MESSAGE_BYTES). Return less per call (or stream it in parts), or raise "
        "SERVE_MAX_MESSAGE_BYTES where the driver and the controller run, up to 2 GiB - 1."
    )


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error(frame_id: int, exc: BaseException, kind: int) -> FrameHeader:
    return FrameHeader(
        kind=FRAME_KIND_ERROR,
        frame_id=frame_id,
        error_kind=kind,  # type: ignore[arg-type]
        error=error_info(exc, with_traceback=kind != ERROR_KIND_CANCELLED),
    )
