"""``serve.run(app, _local_testing_mode=True)``: every deployment in this process, no daemons.

As in Ray, this is for unit tests: deployments are built in the driver, one instance each, and
handles reach them without gRPC, processes or a controller. Routing, queueing, cancellation and
streaming still go through the same router as always; only the replica connection is replaced
by :class:`LocalConnection`, which runs the call on the driver's IO loop (sync code on worker
threads). Arguments and results are still encoded with the handle's codecs, so what a test
passes is what a real replica would receive.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import Callable
from typing import Any

from serve._client import ServeClient
from serve._context import (
    ReplicaContext,
    RequestContext,
    local_replica_context,
    set_current_deadline,
    set_current_request,
)
from serve._deployment import BuiltDeployment
from serve._exchange import ConnectionLost, Envelope, ReplyListener
from serve._models import (
    ApplicationStatus,
    DeploymentID,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ReplicaID,
    ReplicaInfo,
    ReplicaSet,
    ReplicaState,
)
from serve._router import Router
from serve._routing_state import RoutingState
from serve._serialization import decode_args, encode_buffers
from serve._sync import run_sync
from serve._user_methods import build_target, maybe_await, user_method
from serve.exceptions import RequestCancelledError, ServeError
from serve.handle import DeploymentHandle
from serve.schema import ApplicationStatusOverview, DeploymentStatusOverview, ServeStatus


class LocalReplica:
    """One deployment's instance, built in this process."""

    def __init__(self, deployment_id: DeploymentID, built: BuiltDeployment) -> None:
        self.deployment_id = deployment_id
        self.built = built
        self.config = built.deployment.config
        self.replica_id = ReplicaID("local", deployment_id)
        self.context = ReplicaContext(
            app_name=deployment_id.app_name,
            deployment=deployment_id.name,
            replica_tag="local",
            replica_id=self.replica_id,
        )
        self.instance: Any = None
        self.is_function = False
        self.ongoing = 0

    async def start(self) -> None:
        """Build the instance (constructors may be async) and apply its user_config."""
        token = local_replica_context.set(self.context)
        try:
            built = self.built
            instance, self.is_function = await build_target(
                built.deployment.func_or_class, built.init_args, built.init_kwargs
            )
            self.instance = instance
            self.context = ReplicaContext(
                app_name=self.context.app_name,
                deployment=self.context.deployment,
                replica_tag="local",
                replica_id=self.replica_id,
                servable_object=instance,
            )
            if self.config.user_config is not None:
                await maybe_await(instance.reconfigure(self.config.user_config))
        finally:
            local_replica_context.reset(token)

    def method(self, name: str) -> Callable[..., Any]:
        return user_method(self.instance, name, self.deployment_id.name, self.is_function)


class LocalConnection:
    """The Connection a router uses for a local replica: calls run on this loop."""

    def __init__(
        self,
        replica: LocalReplica,
        on_load: Callable[[int, int], None],
        on_broken: Callable[[Any, ConnectionLost], None],
    ) -> None:
        self.replica_id = str(replica.replica_id)
        self.broken: ConnectionLost | None = None
        self._replica = replica
        self._on_load = on_load
        self._next_frame_id = 0
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._credits: dict[int, asyncio.Semaphore] = {}
        self._reservations: set[int] = set()  # slots held for handle.choose_replica()

    def send(
        self,
        envelope: Envelope,
        listener: ReplyListener,
        request: Any,
        reservation_frame_id: int = 0,
    ) -> int:
        replica = self._replica
        if reservation_frame_id in self._reservations:  # its slot is held already
            self._reservations.discard(reservation_frame_id)
            frame_id = reservation_frame_id
        else:
            self._next_frame_id += 1
            frame_id = self._next_frame_id
            if replica.ongoing >= replica.config.max_ongoing_requests and not envelope.no_reject:
                self._on_load(replica.ongoing, frame_id)
                asyncio.get_running_loop().call_soon(listener.on_rejected, request, False)
                return frame_id
            replica.ongoing += 1
        if envelope.stream:
            self._credits[frame_id] = asyncio.Semaphore(envelope.stream_window or 64)
        context = contextvars.copy_context()
        task = asyncio.get_running_loop().create_task(
            self._run(frame_id, envelope, listener, request),
            name=f"local:{envelope.method}",
            context=context,
        )
        self._tasks[frame_id] = task
        return frame_id

    async def _run(
        self, frame_id: int, envelope: Envelope, listener: ReplyListener, request: Any
    ) -> None:
        replica = self._replica
        local_replica_context.set(replica.context)
        set_current_request(
            RequestContext(
                request_id=envelope.request_id,
                app_name=replica.deployment_id.app_name,
                deployment=replica.deployment_id.name,
                method=envelope.method,
                multiplexed_model_id=envelope.model_id,
                deadline_s=envelope.deadline_s,
            )
        )
        set_current_deadline(envelope.deadline_s)  # one process, one clock: as is
        try:
            args, kwargs = decode_args(
                envelope.request_codec,
                envelope.args,
                envelope.kwargs,
                envelope.buffers or None,
                envelope.args_buffer_count,
            )
            method = replica.method(envelope.method)
            if envelope.stream:
                await self._stream(frame_id, envelope, listener, request, method, args, kwargs)
                self._answer(frame_id, listener.on_end, request)
            else:
                value = await self._call(method, args, kwargs)
                payload, buffers = encode_buffers(envelope.response_codec, value)
                self._answer(frame_id, listener.on_result, request, memoryview(payload), buffers)
        except asyncio.CancelledError:
            self._answer(frame_id, listener.on_error, request, RequestCancelledError(), True)
        except Exception as exc:
            self._answer(frame_id, listener.on_error, request, exc, False)
        finally:
            replica.ongoing -= 1
            self._tasks.pop(frame_id, None)
            self._credits.pop(frame_id, None)

    def _answer(self, frame_id: int, deliver: Callable[..., None], *args: Any) -> None:
        self._on_load(self._replica.ongoing - 1, frame_id)
        deliver(*args)

    async def _call(self, method: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(method):
            return await method(*args, **kwargs)
        return await maybe_await(await asyncio.to_thread(method, *args, **kwargs))

    async def _stream(
        self,
        frame_id: int,
        envelope: Envelope,
        listener: ReplyListener,
        request: Any,
        method: Callable[..., Any],
        args: Any,
        kwargs: dict[str, Any],
    ) -> None:
        credit = self._credits[frame_id]
        produced = method(*args, **kwargs)
        if inspect.isawaitable(produced):
            produced = await produced
        if inspect.isasyncgen(produced):
            async for item in produced:
                await credit.acquire()
                payload, buffers = encode_buffers(envelope.response_codec, item)
                listener.on_item(request, memoryview(payload), buffers)
        elif inspect.isgenerator(produced):
            done = object()
            while (item := await asyncio.to_thread(next, produced, done)) is not done:
                await credit.acquire()
                payload, buffers = encode_buffers(envelope.response_codec, item)
                listener.on_item(request, memoryview(payload), buffers)
        else:
            raise TypeError(
                f"Called method '{envelope.method}' with `handle.options(stream=True)` but it "
                "did not return a generator."
            )

    def reserve(self, listener: ReplyListener, request: Any) -> int:
        self._next_frame_id += 1
        frame_id = self._next_frame_id
        replica = self._replica
        loop = asyncio.get_running_loop()
        if replica.ongoing >= replica.config.max_ongoing_requests:
            loop.call_soon(listener.on_rejected, request, False)
        else:
            replica.ongoing += 1
            self._reservations.add(frame_id)
            loop.call_soon(listener.on_reserved, request)
        self._on_load(replica.ongoing, frame_id)
        return frame_id

    def release(self, frame_id: int) -> None:
        if frame_id in self._reservations:
            self._reservations.discard(frame_id)
            self._replica.ongoing -= 1

    def cancel(self, frame_id: int) -> None:
        task = self._tasks.get(frame_id)
        if task is not None:
            task.cancel()

    def credit(self, frame_id: int, count: int, nbytes: int) -> None:
        credit = self._credits.get(frame_id)
        if credit is not None:
            for _ in range(count):
                credit.release()

    def feed(self, frame_id: int, payload: bytes) -> None:
        raise ServeError("Local testing mode has no HTTP proxy to feed requests from.")

    async def queue_length(self, timeout_s: float) -> tuple[int, bool]:
        return self._replica.ongoing, True

    async def aclose(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LocalClient(ServeClient):
    """The process's client in local testing mode: deployments live in this process."""

    def __init__(self) -> None:
        super().__init__("local", token=None, tls=None, owner=None)
        self.replicas: dict[DeploymentID, LocalReplica] = {}
        self.apps: dict[str, str] = {}  # application -> ingress deployment

    def routing_state(self, deployment_id: DeploymentID) -> RoutingState:
        state = self._states.get(deployment_id)
        if state is None:
            replica = self.replicas.get(deployment_id)

            async def watch(_: DeploymentID) -> Any:
                if replica is None:
                    yield ReplicaSet(version=1, exists=False)
                else:
                    info = ReplicaInfo(
                        str(replica.replica_id),
                        "local",
                        self.host,
                        replica.config.max_ongoing_requests,
                    )
                    yield ReplicaSet(
                        version=1,
                        exists=True,
                        replicas=(info,),
                        max_queued_requests=replica.config.max_queued_requests,
                        max_ongoing_requests=replica.config.max_ongoing_requests,
                    )
                await asyncio.Event().wait()  # the set never changes

            def open_connection(
                info: ReplicaInfo,
                on_load: Callable[[int, int], None],
                on_broken: Callable[[Any, ConnectionLost], None],
            ) -> LocalConnection:
                assert replica is not None
                return LocalConnection(replica, on_load, on_broken)

            state = RoutingState(
                deployment_id, watch=watch, open_connection=open_connection, local_host=self.host
            )
            self._states[deployment_id] = state
            state.start()
        return state

    def bind(self, handle: DeploymentHandle[Any]) -> DeploymentHandle[Any]:
        """Make ``handle`` route to this process's local deployments (local testing mode beside
        a real controller, which every other handle keeps using)."""
        handle._core.router = Router(self, handle.deployment_id)
        return handle

    def deploy(self, app_name: str, ingress: str, built: list[BuiltDeployment]) -> None:
        """Build every deployment of an application in this process (children first),
        replacing what an earlier run of the same name built."""
        self.delete(app_name)

        async def start_all() -> None:
            for deployment in built:
                deployment_id = DeploymentID(deployment.name, app_name)
                replica = LocalReplica(deployment_id, deployment)
                await replica.start()
                self.replicas[deployment_id] = replica

        run_sync(start_all())
        self.apps[app_name] = ingress

    def delete(self, app_name: str) -> bool:
        if app_name not in self.apps:
            return False
        del self.apps[app_name]
        gone = [d for d in self.replicas if d.app_name == app_name]
        states = [self._states.pop(d) for d in gone if d in self._states]
        for deployment_id in gone:
            del self.replicas[deployment_id]
        run_sync(_close_all(states))
        return True

    def application(self, app_name: str) -> tuple[str, list[str]] | None:
        if app_name not in self.apps:
            return None
        names = [d.name for d in self.replicas if d.app_name == app_name]
        return self.apps[app_name], names

    def status(self) -> ServeStatus:
        applications = {}
        for app_name in self.apps:
            deployments = {
                d.name: DeploymentStatusOverview(
                    status=DeploymentStatus.HEALTHY,
                    status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
                    replica_states={ReplicaState.RUNNING: 1},
                )
                for d in self.replicas
                if d.app_name == app_name
            }
            applications[app_name] = ApplicationStatusOverview(
                status=ApplicationStatus.RUNNING,
                message="",
                last_deployed_time_s=0.0,
                deployments=deployments,
            )
        return ServeStatus(applications=applications)


async def _close_all(states: list[RoutingState]) -> None:
    await asyncio.gather(*(state.aclose() for state in states), return_exceptions=True)
