"""The replica's gRPC servicer: the Connect data stream plus unary control calls.

Frames are turned into executor calls here and executor outcomes into frames; nothing else in
the replica sees protobuf.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from replica.executor import Executor
from serve._context import RequestContext
from serve._logging import ACCESS_LOGGER
from serve._models import DeploymentSpec
from serve._proto import replica_pb2
from serve._proto.replica_pb2 import (
    ERROR_KIND_CANCELLED,
    ERROR_KIND_SYSTEM,
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
    REJECT_REASON_FULL,
    FrameHeader,
)
from serve._rpc.channel import Context
from serve._rpc.convert import code_env_from_proto, config_from_proto
from serve._rpc.frames import BatchWriter, FrameError, read_frames
from serve._rpc.service import add_service
from serve._rpc.status import error_info
from serve._serialization import decode_args, encode_buffers
from serve._settings import SESSION_METADATA_KEY
from serve.exceptions import ServeError

logger = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)

DEFAULT_STREAM_WINDOW = 64


class _SystemError(Exception):
    """The request could not be run at all (bad payload, unknown method)."""


class _Lane:
    """Frames going back to one router on one gRPC stream; whatever is queued goes out as one
    message when the writer is free."""

    def __init__(self) -> None:
        self.writer = BatchWriter()
        self.wakeup = asyncio.Event()
        self.idle = asyncio.Event()  # nothing queued and nothing being written
        self.idle.set()

    def send(
        self, header: FrameHeader, *body: bytes | memoryview, buffers: list[bytes] | None = None
    ) -> None:
        self.writer.add(header, *body, buffers=buffers or ())
        self.idle.clear()
        if not self.wakeup.is_set():
            self.wakeup.set()

    async def write_loop(self, context: Context) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            await self.flush(context)

    async def flush(self, context: Context) -> None:
        while self.writer.count:
            for message in self.writer.take():
                await context.write(message)
        self.idle.set()


class StreamSession:
    """One router process's Connect session: many requests, replies coalesced per write.

    Admission answers go back on the Connect stream. Outcomes go on the session's Results
    stream when the router opened one (``session_id``), else on Connect too.
    """

    def __init__(self, executor: Executor, context: Context, session_id: str = "") -> None:
        self._executor = executor
        self._context = context
        self.session_id = session_id
        self._control = _Lane()
        self._outcomes = _Lane() if session_id else self._control
        self._finished = asyncio.Event()
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._cancel_requested: set[int] = set()
        # Requests holding an admission slot. The slot is released by the request's own code,
        # or by its task's done-callback if the task was cancelled before it ever ran.
        self._holding: set[int] = set()
        self._credits: dict[int, int] = {}
        self._credit_events: dict[int, asyncio.Event] = {}
        self._closing = False

    async def run(self) -> None:
        writer = asyncio.create_task(
            self._control.write_loop(self._context), name="replica:conn:write"
        )
        try:
            while True:
                message = await self._context.read()
                if message is grpc.aio.EOF:
                    break
                for header, body, buffers in await read_frames(message, self._context.read):
                    self._on_frame(header, body, buffers)
            # The router half-closed: finish what it sent, then end the stream.
            while self._tasks:
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._control.flush(self._context)
        except FrameError as exc:
            await self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed batch: {exc}")
        finally:
            self._closing = True
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self._finished.set()

    async def wait_flushed(self) -> None:
        """Until everything queued for the router has been written (before closing)."""
        await self._control.idle.wait()
        await self._outcomes.idle.wait()

    async def serve_outcomes(self, context: Context) -> None:
        """Run the Results stream of this session until the session ends."""
        writer = asyncio.create_task(
            self._outcomes.write_loop(context), name="replica:conn:results"
        )
        try:
            await self._finished.wait()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            if not self._closing or self._outcomes.writer.count:
                await self._outcomes.flush(context)
        finally:
            writer.cancel()

    def _send(
        self, header: FrameHeader, *body: bytes | memoryview, buffers: list[bytes] | None = None
    ) -> None:
        """An admission answer (ACCEPTED, REJECTED)."""
        self._control.send(header, *body, buffers=buffers)

    def _send_outcome(
        self, header: FrameHeader, *body: bytes | memoryview, buffers: list[bytes] | None = None
    ) -> None:
        """An outcome (RESULT, ERROR, ITEM, END)."""
        self._outcomes.send(header, *body, buffers=buffers)

    def _on_frame(self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None) -> None:
        kind = header.kind
        if kind == FRAME_KIND_REQUEST:
            self._on_request(header, body, buffers)
        elif kind == FRAME_KIND_CANCEL:
            task = self._tasks.get(header.id)
            if task is not None:
                self._cancel_requested.add(header.id)
                task.cancel()  # a task that has not started yet ends in _on_task_done
        elif kind == FRAME_KIND_CREDIT:
            if header.id in self._credits:
                self._credits[header.id] += header.credit
                self._credit_events[header.id].set()
        else:
            raise FrameError(f"Unexpected frame kind {kind} from a router.")

    def _on_request(
        self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None
    ) -> None:
        executor = self._executor
        frame_id = header.id
        if executor.draining:
            self._reject(frame_id, REJECT_REASON_DRAINING)
            return
        if header.no_reject:
            task = asyncio.create_task(
                self._wait_then_run(header, body, buffers), name="replica:broadcast"
            )
        elif executor.admit():
            self._holding.add(frame_id)
            # ACCEPTED is handed to gRPC before any user code runs (the writer wakes before the
            # task's first step): a request whose replica dies without having said ACCEPTED never
            # reached user code, so retrying it elsewhere can never run it twice.
            self._send(FrameHeader(kind=FRAME_KIND_ACCEPTED, id=frame_id, ongoing=executor.ongoing))
            task = asyncio.create_task(
                self._run(header, body, buffers), name=f"replica:{header.method}"
            )
        else:
            self._reject(frame_id, REJECT_REASON_FULL)
            return
        self._tasks[frame_id] = task
        task.add_done_callback(functools.partial(self._on_task_done, frame_id))

    def _reject(self, frame_id: int, reason: int) -> None:
        self._send(
            FrameHeader(
                kind=FRAME_KIND_REJECTED,
                id=frame_id,
                ongoing=self._executor.ongoing,
                reject_reason=reason,  # type: ignore[arg-type]
            )
        )

    def _send_cancelled(self, frame_id: int) -> None:
        """The outcome of a request cancelled before its code ran (or while it waited)."""
        error = _error(frame_id, asyncio.CancelledError(), ERROR_KIND_CANCELLED)
        error.ongoing = self._executor.ongoing
        self._send_outcome(error)

    def _on_task_done(self, frame_id: int, task: asyncio.Task[None]) -> None:
        """Every request ends here, whether or not its coroutine ever ran."""
        self._tasks.pop(frame_id, None)
        cancelled = frame_id in self._cancel_requested
        self._cancel_requested.discard(frame_id)
        if frame_id in self._holding:  # cancelled before it started: _run never released
            self._holding.discard(frame_id)
            self._executor.release()
            if cancelled and not self._closing:
                self._send_cancelled(frame_id)
        elif cancelled and not self._closing and task.cancelled():
            # A broadcast call cancelled while it waited for a slot: it still gets an answer.
            self._send_cancelled(frame_id)

    async def _wait_then_run(
        self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None
    ) -> None:
        """Broadcast calls wait for a slot instead of being rejected."""
        executor = self._executor
        await executor.wait_admitted()
        self._holding.add(header.id)
        self._send(FrameHeader(kind=FRAME_KIND_ACCEPTED, id=header.id, ongoing=executor.ongoing))
        await self._run(header, body, buffers)

    async def _run(
        self, header: FrameHeader, body: memoryview, buffers: list[bytes] | None
    ) -> None:
        """Run one admitted request and send its outcome; releases its slot exactly once."""
        executor = self._executor
        frame_id = header.id
        request = RequestContext(
            request_id=header.request_id,
            app_name=executor.app_name,
            deployment=executor.deployment,
            method=header.method,
            multiplexed_model_id=header.model_id,
        )
        reply: tuple[FrameHeader, *tuple[bytes, ...]] | None = None
        reply_buffers: list[bytes] = []
        started = time.perf_counter()
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
            try:
                executor.resolve(header.method)
            except ServeError as exc:
                raise _SystemError(str(exc)) from exc
            if header.stream:
                await self._run_stream(header, args, kwargs, request)
                reply = (FrameHeader(kind=FRAME_KIND_END, id=frame_id),)
            else:
                value = await executor.call(header.method, args, kwargs, request)
                payload, reply_buffers = encode_buffers(header.response_codec, value)
                reply = (FrameHeader(kind=FRAME_KIND_RESULT, id=frame_id), payload)
        except asyncio.CancelledError:
            if self._closing or frame_id not in self._cancel_requested:
                raise
            self._cancel_children(request)
            reply = (_error(frame_id, asyncio.CancelledError(), ERROR_KIND_CANCELLED),)
        except _SystemError as exc:
            reply = (_error(frame_id, ServeError(str(exc)), ERROR_KIND_SYSTEM),)
        except Exception as exc:
            reply = (_error(frame_id, exc, ERROR_KIND_USER),)
        finally:
            self._holding.discard(frame_id)
            executor.release()
            self._cancel_requested.discard(frame_id)
            if reply is not None:
                header_out = reply[0]
                header_out.ongoing = executor.ongoing
                self._send_outcome(*reply, buffers=reply_buffers)
                duration_ms = (time.perf_counter() - started) * 1000.0
                failed = header_out.kind == FRAME_KIND_ERROR
                cancelled = failed and header_out.error_kind == ERROR_KIND_CANCELLED
                executor.stats.record(duration_ms, error=failed and not cancelled)
                if executor.access_log:
                    outcome = "CANCELLED" if cancelled else "ERROR" if failed else "OK"
                    access.info(
                        "%s %s %.1fms",
                        header.method,
                        outcome,
                        duration_ms,
                        extra={
                            "request_id": header.request_id,
                            "method": header.method,
                            "outcome": outcome,
                            "duration_ms": round(duration_ms, 3),
                        },
                    )

    async def _run_stream(
        self, header: FrameHeader, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> None:
        """Send each item as it is produced, pausing when the router's credit runs out."""
        frame_id = header.id
        self._credits[frame_id] = header.stream_window or DEFAULT_STREAM_WINDOW
        event = self._credit_events[frame_id] = asyncio.Event()
        codec = header.response_codec
        try:
            async for item in self._executor.stream(header.method, args, kwargs, request):
                while self._credits[frame_id] <= 0:
                    event.clear()
                    await event.wait()
                self._credits[frame_id] -= 1
                payload, item_buffers = encode_buffers(codec, item)
                self._send_outcome(
                    FrameHeader(kind=FRAME_KIND_ITEM, id=frame_id), payload, buffers=item_buffers
                )
        finally:
            del self._credits[frame_id]
            del self._credit_events[frame_id]

    def _cancel_children(self, request: RequestContext) -> None:
        for child in list(request.children):
            child.router.cancel(child)


def _error(frame_id: int, exc: BaseException, kind: int) -> FrameHeader:
    return FrameHeader(
        kind=FRAME_KIND_ERROR,
        id=frame_id,
        error_kind=kind,  # type: ignore[arg-type]
        error=error_info(exc, with_traceback=kind != ERROR_KIND_CANCELLED),
    )


class ReplicaServicer:
    """Every method of serve.v1.Replica; Connect and Results move raw frames."""

    SESSION_WAIT_S = 10.0

    def __init__(
        self,
        executor: Executor,
        on_stop: Callable[[float], Any],
        on_initialized: Callable[[], None] = lambda: None,
    ) -> None:
        self._executor = executor
        self._on_stop = on_stop
        self._on_initialized = on_initialized
        self._init_lock = asyncio.Lock()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[Any]] = set()
        self._by_id: dict[str, StreamSession] = {}
        self._live: set[StreamSession] = set()
        self._session_added = asyncio.Event()

    async def Connect(self, request_iterator: Any, context: Context) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        session_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == SESSION_METADATA_KEY and isinstance(value, str):
                session_id = value
        session = StreamSession(self._executor, context, session_id)
        self._live.add(session)
        if session_id:
            self._by_id[session_id] = session
            added, self._session_added = self._session_added, asyncio.Event()
            added.set()
        try:
            await session.run()
        except asyncio.CancelledError:
            if task not in self._closing:
                raise
        finally:
            self._sessions.discard(task)
            self._live.discard(session)
            if self._by_id.get(session_id) is session:
                del self._by_id[session_id]

    async def Results(self, request: replica_pb2.ResultsRequest, context: Context) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            session = await self._find_session(request.session)
            if session is None:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"No Connect session {request.session!r}: open Connect with the "
                    f"{SESSION_METADATA_KEY} metadata first.",
                )
            await session.serve_outcomes(context)
        except asyncio.CancelledError:
            if task not in self._closing:
                raise
        finally:
            self._sessions.discard(task)

    async def _find_session(self, session_id: str) -> StreamSession | None:
        """The Connect session with this id; the two streams may arrive in either order."""
        try:
            async with asyncio.timeout(self.SESSION_WAIT_S):
                while session_id not in self._by_id:
                    await self._session_added.wait()
        except TimeoutError:
            return None
        return self._by_id[session_id]

    async def close_sessions(self, flush_timeout_s: float = 5.0) -> None:
        """End every stream (at stop, after draining) so routers see them close.

        Replies already queued (results of the last requests) are written first.
        """
        try:
            async with asyncio.timeout(flush_timeout_s):
                await asyncio.gather(*(s.wait_flushed() for s in list(self._live)))
        except TimeoutError:
            logger.warning("Some replies could not be written before the streams closed")
        self._closing = set(self._sessions)
        for task in self._closing:
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def Initialize(
        self, request: replica_pb2.InitializeRequest, context: Context
    ) -> replica_pb2.InitializeResponse:
        async with self._init_lock:
            if self._executor.initialized:
                return replica_pb2.InitializeResponse(ok=True)
            spec = request.spec
            try:
                await self._executor.initialize(
                    DeploymentSpec(
                        name=spec.name,
                        serialized_callable=spec.serialized_callable,
                        serialized_init_args=spec.serialized_init_args,
                        code_version=spec.code_version,
                        config=config_from_proto(spec.config),
                    ),
                    code_env_from_proto(request.code_env),
                )
            except Exception as exc:
                logger.error("The deployment's constructor failed", exc_info=exc)
                return replica_pb2.InitializeResponse(ok=False, error=error_info(exc))
            self._on_initialized()
        return replica_pb2.InitializeResponse(ok=True)

    async def Reconfigure(
        self, request: replica_pb2.ReconfigureRequest, context: Context
    ) -> replica_pb2.ReconfigureResponse:
        try:
            await self._executor.reconfigure(
                config_from_proto(request.config), request.user_config_changed
            )
        except Exception as exc:
            logger.error("reconfigure() failed", exc_info=exc)
            return replica_pb2.ReconfigureResponse(ok=False, error=error_info(exc))
        return replica_pb2.ReconfigureResponse(ok=True)

    async def CheckHealth(
        self, request: replica_pb2.CheckHealthRequest, context: Context
    ) -> replica_pb2.CheckHealthResponse:
        try:
            await self._executor.check_health()
        except Exception as exc:
            return replica_pb2.CheckHealthResponse(ok=False, error=error_info(exc))
        return replica_pb2.CheckHealthResponse(ok=True)

    async def QueueLength(
        self, request: replica_pb2.QueueLengthRequest, context: Context
    ) -> replica_pb2.QueueLengthResponse:
        executor = self._executor
        return replica_pb2.QueueLengthResponse(
            ongoing=executor.ongoing, accepting=not executor.draining
        )

    async def Stop(
        self, request: replica_pb2.StopRequest, context: Context
    ) -> replica_pb2.StopResponse:
        abandoned = await self._on_stop(request.timeout_s)
        return replica_pb2.StopResponse(abandoned=abandoned)


def register(server: grpc.aio.Server, servicer: ReplicaServicer) -> None:
    """Register the servicer; Connect takes and returns raw bytes (see serve/_rpc/frames.py)."""
    add_service(
        server,
        replica_pb2.DESCRIPTOR,
        "Replica",
        servicer,
        raw=["Connect"],
        raw_responses=["Results"],
    )
