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
import enum
import functools
import logging
import time
from typing import Any

from replica.executor import Executor
from replica.feed import InputFeed
from serve import _tracing
from serve._context import RequestContext
from serve._ingress import ASGI_METHOD, FED_METHODS, unpack_asgi_args
from serve._logging import access_log
from serve._rpc.replica_stream import (
    ErrorKind,
    ErrorReply,
    FrameError,
    IncomingRequest,
    ReplicaStream,
)
from serve._serialization import Unencodable, decode_args, encode_buffers
from serve._settings import settings
from serve.exceptions import RemoteError, RequestTimeoutError, ServeError

logger = logging.getLogger(__name__)

SEGMENT_LINGER_S = 2.0  # a live router's time to take the last segments of a closing stream
DEFAULT_STREAM_WINDOW = 64
DEFAULT_STREAM_WINDOW_BYTES = 16 * 1024 * 1024
# A budget above this (or not a positive number) is no deadline at all: timers cannot hold it.
MAX_TIMEOUT_S = 1e7


class _Done(enum.Enum):
    """A request's answer when it is not an error: its result, or the end of its stream."""

    RESULT = "result"
    END = "end"


Reply = tuple[_Done | ErrorReply, tuple[bytes, ...], list[bytes]]  # answer, body, buffers


class _SystemError(Exception):
    """The request could not be run at all (bad payload, unknown method)."""


class StreamSession:
    """The requests of one Connect stream, their tasks, and the answers they owe.

    Frames reach it as calls (a :class:`~serve._rpc.replica_stream.FrameListener`) from its
    :class:`~serve._rpc.replica_stream.ReplicaStream`, the wire edge, which also writes the
    answers: the session sees no protobuf.
    """

    def __init__(self, executor: Executor, stream: ReplicaStream) -> None:
        self._executor = executor
        self._stream = stream
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
        writer = asyncio.create_task(self._stream.write(), name="replica:conn:write")
        try:
            await self._stream.read(self)
            # The router half-closed: finish what it sent, then end the stream.
            while self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._stream.flush()
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
            self._stream.sweep_router_segments()

    @property
    def acked(self) -> int:
        """The highest frame id read on this stream."""
        return self._acked

    async def remove_segments(self, router_alive: bool) -> None:
        """After :meth:`run`: remove this stream's shared-memory segments. A router still
        alive (the replica closed the stream, or the router half-closed it) may still read the
        last results: it gets a moment to take them first."""
        await self._stream.remove_segments(SEGMENT_LINGER_S if router_alive else 0.0)

    async def wait_flushed(self) -> None:
        """Until everything queued for the router has been written (before closing)."""
        await self._stream.idle.wait()

    def _send_error(self, frame_id: int, error: ErrorReply) -> None:
        self._stream.error(frame_id, error, self._executor.ongoing, self._acked)

    # What the router sends (FrameListener).

    def on_input(self, frame_id: int, body: memoryview) -> None:
        feed = self._feeds.get(frame_id)
        if feed is not None:  # else rejected or finished: the router re-feeds or is done
            feed.put(body)

    def on_credit(self, frame_id: int, count: int, nbytes: int) -> None:
        credit = self._credits.get(frame_id)
        if credit is not None:
            credit[0] += count
            credit[1] += nbytes
            event = self._credit_events.get(frame_id)
            if event is not None:
                event.set()

    def on_release(self, frame_id: int) -> None:
        if frame_id in self._reservations:
            self._reservations.discard(frame_id)
            self._executor.release()

    def on_cancel(self, frame_id: int) -> None:
        self._cancel(frame_id)

    def on_request(self, incoming: IncomingRequest) -> None:
        executor = self._executor
        frame_id = incoming.frame_id
        if frame_id > self._acked:
            self._acked = frame_id
        if incoming.reserved and frame_id in self._reservations:
            # Its slot is already held (even while draining: it was promised before).
            self._reservations.discard(frame_id)
            admitted = True
        elif executor.draining:
            self._reject(frame_id, draining=True)
            return
        else:
            admitted = incoming.no_reject or executor.admit()
        if not admitted:
            self._reject(frame_id, draining=False)
            return
        timeout_s = incoming.timeout_s
        deadline_s = 0.0
        if 0.0 < timeout_s <= MAX_TIMEOUT_S:  # False for NaN too
            deadline_s = time.monotonic() + timeout_s
        if incoming.no_reject and not incoming.reserved:
            task = asyncio.create_task(
                self._wait_then_run(incoming, deadline_s), name="replica:broadcast"
            )
        else:
            self._holding.add(frame_id)
            task = asyncio.create_task(
                self._run(incoming, deadline_s), name=f"replica:{incoming.method}"
            )
        self._tasks[frame_id] = task
        if incoming.method in FED_METHODS:
            self._feeds[frame_id] = InputFeed(
                functools.partial(self._input_read, frame_id),
                functools.partial(self._cancel, frame_id),
            )
        task.add_done_callback(functools.partial(self._on_task_done, frame_id))
        if deadline_s:
            self._deadline_timers[frame_id] = asyncio.get_running_loop().call_later(
                timeout_s, self._on_deadline, frame_id, incoming
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
            self._stream.input_credit(frame_id, count, nbytes)

    def on_reserve(self, frame_id: int) -> None:
        if frame_id > self._acked:
            self._acked = frame_id
        if self._executor.draining:
            self._reject(frame_id, draining=True)
        elif frame_id in self._reservations or frame_id in self._tasks:
            raise FrameError(f"Frame id {frame_id} is already in use on this stream.")
        elif self._executor.admit():
            self._reservations.add(frame_id)
            self._stream.reserved(frame_id, self._executor.ongoing, self._acked)
        else:
            self._reject(frame_id, draining=False)

    def _reject(self, frame_id: int, *, draining: bool) -> None:
        self._stream.rejected(frame_id, draining, self._executor.ongoing, self._acked)

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
                self._send_error(frame_id, _error(timed_out, ErrorKind.SYSTEM))
            elif cancelled and not self._closing:
                self._send_error(frame_id, _error(asyncio.CancelledError(), ErrorKind.CANCELLED))
        elif cancelled and not self._closing and task.cancelled():
            # A broadcast call cancelled while it waited for a slot: it still gets an answer.
            self._send_error(frame_id, _error(asyncio.CancelledError(), ErrorKind.CANCELLED))

    async def _wait_then_run(self, incoming: IncomingRequest, deadline_s: float) -> None:
        """Broadcast calls wait for a slot instead of being rejected."""
        await self._executor.wait_admitted()
        self._holding.add(incoming.frame_id)
        await self._run(incoming, deadline_s)

    async def _run(self, incoming: IncomingRequest, deadline_s: float) -> None:
        """Run one admitted request and send its outcome; releases its slot exactly once."""
        executor = self._executor
        frame_id = incoming.frame_id
        request = RequestContext(
            request_id=incoming.request_id,
            app_name=executor.app_name,
            deployment=executor.deployment,
            method=incoming.method,
            multiplexed_model_id=incoming.model_id,
            feed=self._feeds.get(frame_id),
            deadline_s=deadline_s,
        )
        self._contexts[frame_id] = request
        reply: Reply | None = None
        started = time.perf_counter()
        try:
            if deadline_s and time.monotonic() >= deadline_s:
                # Its budget was spent before it could start: no user code runs.
                timed_out = self._timed_out.setdefault(frame_id, self._timeout_error(incoming))
                reply = (_error(timed_out, ErrorKind.SYSTEM), (), [])
            else:
                reply = await self._outcome(incoming, request)
        except asyncio.CancelledError:
            if self._closing or (
                frame_id not in self._cancel_requested and frame_id not in self._timed_out
            ):
                raise  # the stream is gone: nobody to answer
            reply = (_error(asyncio.CancelledError(), ErrorKind.CANCELLED), (), [])
        finally:
            self._contexts.pop(frame_id, None)
            self._holding.discard(frame_id)
            executor.release()
            self._cancel_requested.discard(frame_id)
            if request.trace is not None:
                error = reply[0] if reply is not None else None
                _tracing.end_replica(request, error if isinstance(error, ErrorReply) else None)
            if reply is not None:
                if deadline_s:
                    # Past its deadline the answer is the timeout, whatever the code did since.
                    expired = self._timed_out.get(frame_id)
                    if expired is not None:
                        reply = (_error(expired, ErrorKind.SYSTEM), (), [])
                self._finish(incoming, reply, started)

    def _timeout_error(self, incoming: IncomingRequest) -> RequestTimeoutError:
        return RequestTimeoutError(
            deployment=str(self._executor.replica_id.deployment_id),
            method=incoming.method,
            timeout_s=incoming.timeout_s,
        )

    def _on_deadline(self, frame_id: int, incoming: IncomingRequest) -> None:
        """A request's deadline passed: its nested calls fail, then its code is cancelled."""
        self._deadline_timers.pop(frame_id, None)
        task = self._tasks.get(frame_id)
        if task is None or task.done():
            return
        self._timed_out[frame_id] = self._timeout_error(incoming)
        request = self._contexts.get(frame_id)
        if request is not None:
            for child in list(request.children):
                child.expire()
        # Cancel one loop turn later, so that code awaiting a nested call sees that call's
        # RequestTimeoutError (and may clean up) rather than a bare CancelledError.
        asyncio.get_running_loop().call_soon(task.cancel)

    async def _outcome(self, incoming: IncomingRequest, request: RequestContext) -> Reply:
        """The answer to one request, whatever its code does (cancellation aside)."""
        frame_id = incoming.frame_id
        executor = self._executor
        body = incoming.body
        try:
            try:
                args, kwargs = decode_args(
                    incoming.request_codec,
                    body[: incoming.args_len],
                    body[incoming.args_len :],
                    incoming.buffers,
                    incoming.args_buffer_count,
                )
                if incoming.method == ASGI_METHOD:
                    args = unpack_asgi_args(args)
            except Exception as exc:
                raise _SystemError(f"Could not decode the request arguments: {exc}") from exc
            if _tracing.enabled:
                _tracing.start_replica(
                    request,
                    incoming.trace_context,
                    incoming.method,
                    args,
                    executor.replica_id.unique_id,
                    incoming.stream,
                )
            try:
                executor.resolve(incoming.method)
            except ServeError as exc:
                raise _SystemError(str(exc)) from exc
            if incoming.stream:
                await self._run_stream(incoming, args, kwargs, request)
                return _Done.END, (), []
            value = await executor.call(incoming.method, args, kwargs, request)
            payload, reply_buffers = _encode(incoming.response_codec, value, "result")
            return _Done.RESULT, (payload,), reply_buffers
        except asyncio.CancelledError:
            if frame_id in self._cancel_requested or frame_id in self._timed_out or self._closing:
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # User code let a CancelledError of its own escape (an inner task was cancelled, or
            # a sync method raised concurrent.futures.CancelledError): the request was
            # cancelled inside the replica, and its caller hears so.
            return _error(asyncio.CancelledError(), ErrorKind.CANCELLED), (), []
        except _SystemError as exc:
            return _error(ServeError(str(exc)), ErrorKind.SYSTEM), (), []
        except Unencodable as exc:
            return _error(TypeError(str(exc)), ErrorKind.USER), (), []
        except Exception as exc:
            return _error(exc, ErrorKind.USER), (), []
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, custom BaseExceptions
            traceback = _error(exc, ErrorKind.USER).traceback
            wrapped = RemoteError(type(exc).__name__, _describe(exc), traceback)
            return _error(wrapped, ErrorKind.USER), (), []

    def _finish(self, incoming: IncomingRequest, reply: Reply, started: float) -> None:
        answer, body, reply_buffers = reply
        frame_id = incoming.frame_id
        executor = self._executor
        size = 0
        for part in body:
            size += len(part)
        for buffer in reply_buffers:
            size += len(buffer)
        if size > self._max_bytes:
            answer = _error(_too_big(incoming.method, "result", size), ErrorKind.USER)
            body, reply_buffers = (), []
        if isinstance(answer, ErrorReply):
            failed = True
            cancelled = answer.kind is ErrorKind.CANCELLED
            self._send_error(frame_id, answer)
        else:  # the common answers
            failed = cancelled = False
            self._stream.outcome(
                frame_id,
                executor.ongoing,
                self._acked,
                *body,
                end=answer is _Done.END,
                buffers=reply_buffers,
            )
        duration_ms = (time.perf_counter() - started) * 1000.0
        executor.stats.record(duration_ms, error=failed and not cancelled)
        log = access_log()
        if log is not None and executor.access_log:
            outcome = "CANCELLED" if cancelled else "ERROR" if failed else "OK"
            log.record(incoming.request_id, incoming.method, outcome, duration_ms)

    async def _run_stream(
        self,
        incoming: IncomingRequest,
        args: Any,
        kwargs: dict[str, Any],
        request: RequestContext,
    ) -> None:
        """Send each item as it is produced, while the router's credit covers it in items and in
        bytes, so what is in flight never exceeds the window; an item larger than the whole
        window goes alone, once nothing else is in flight."""
        frame_id = incoming.frame_id
        method = incoming.method
        window_bytes = incoming.stream_window_bytes or DEFAULT_STREAM_WINDOW_BYTES
        credit = self._credits[frame_id] = [
            incoming.stream_window or DEFAULT_STREAM_WINDOW,
            window_bytes,
        ]
        codec = incoming.response_codec
        stream = self._stream

        async def emit(item: Any) -> None:
            payload, item_buffers = _encode(codec, item, "stream item")
            size = len(payload)
            for buffer in item_buffers:
                size += len(buffer)
            if size > self._max_bytes:
                raise Unencodable(str(_too_big(method, "stream item", size)))
            while credit[0] <= 0 or credit[1] < min(size, window_bytes):
                # Made when first needed: most streams (an HTTP response) never wait.
                event = self._credit_events.get(frame_id)
                if event is None:
                    event = self._credit_events[frame_id] = asyncio.Event()
                event.clear()
                await event.wait()
            credit[0] -= 1
            credit[1] -= size
            stream.item(frame_id, payload, item_buffers)

        try:
            if method == ASGI_METHOD:  # the app pushes what it sends
                await self._executor.serve_asgi(args, kwargs, request, emit)
            else:
                async for item in self._executor.stream(method, args, kwargs, request):
                    await emit(item)
        finally:
            del self._credits[frame_id]
            self._credit_events.pop(frame_id, None)

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


def _error(exc: BaseException, kind: ErrorKind) -> ErrorReply:
    return ErrorReply.of(exc, kind)
