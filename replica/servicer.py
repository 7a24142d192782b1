"""The replica's gRPC servicer: the Connect data stream plus unary control calls.

Each Connect stream is one :class:`~replica.session.StreamSession` behind its
:class:`~serve._rpc.replica_stream.ReplicaStream`, which reads and writes the frames; the control
calls (Initialize, Reconfigure, CheckHealth,
QueueLength, Stop) go to the executor, their messages converted here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from replica.executor import Executor
from replica.session import StreamSession
from serve._proto import replica_pb2
from serve._rpc import shm
from serve._rpc.channel import Context
from serve._rpc.convert import code_env_from_proto, config_from_proto, spec_from_proto
from serve._rpc.replica_stream import ReplicaStream
from serve._rpc.service import add_service
from serve._rpc.status import error_info
from serve._settings import ACKED_METADATA_KEY, REPLICA_ID_METADATA_KEY

logger = logging.getLogger(__name__)


class ReplicaServicer:
    """Every method of serve.v1.Replica; Connect moves raw frames."""

    def __init__(
        self,
        executor: Executor,
        on_stop: Callable[[float], Any],
        on_initialized: Callable[[], None] = lambda: None,
    ) -> None:
        self._replica_id = str(executor.replica_id)
        self._executor = executor
        self._on_stop = on_stop
        self._on_initialized = on_initialized
        self._init_lock = asyncio.Lock()
        self._sessions: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[Any]] = set()
        self._live: set[StreamSession] = set()

    async def Connect(self, request_iterator: Any, context: Context) -> None:
        wanted = shm_token = ""
        for key, value in context.invocation_metadata() or ():
            if key == REPLICA_ID_METADATA_KEY and isinstance(value, str):
                wanted = value
            elif key == shm.TOKEN_METADATA_KEY and isinstance(value, str):
                shm_token = value
        if wanted != self._replica_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"This is replica {self._replica_id!r}, not {wanted!r}: the address was reused; "
                "route to the replica set the controller publishes now.",
            )
        # The router writes nothing before these headers: a stream refused above never carried
        # a request, so the router may retry its requests elsewhere.
        headers = [(REPLICA_ID_METADATA_KEY, self._replica_id)]
        proof = shm.answer_hello(shm_token) if shm_token else None
        if proof is not None:  # same host, same user: big buffers go through /dev/shm
            headers.append((shm.PROOF_METADATA_KEY, proof))
        await context.send_initial_metadata(tuple(headers))
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        stream = ReplicaStream(context, shm_token if proof is not None else "")
        session = StreamSession(self._executor, stream)
        self._live.add(session)
        router_alive = True  # unless the router broke the stream (it is gone, or gave up)
        try:
            await session.run()
        except asyncio.CancelledError:
            if task not in self._closing:
                router_alive = False
                raise
        finally:
            self._sessions.discard(task)
            self._live.discard(session)
            await asyncio.shield(session.remove_segments(router_alive))
        # A graceful end (the replica stops): requests after this one were never read, so the
        # router may send them elsewhere.
        context.set_trailing_metadata(((ACKED_METADATA_KEY, str(session.acked)),))

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
            try:
                await self._executor.initialize(
                    spec_from_proto(request.spec),
                    code_env_from_proto(request.code_env),
                    request.rank,
                    request.world_size,
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
    add_service(server, replica_pb2.DESCRIPTOR, "Replica", servicer, raw=["Connect"])
