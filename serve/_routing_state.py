"""What one process knows about one deployment: its replicas, their load, and connections.

One ``RoutingState`` per deployment per process, shared by every router (handle) of it, on
the home loop. It follows the controller's replica sets, keeps queue-length estimates, owns the
replica connections (dropping a replica whose connection breaks at once), probes on request,
and reports this process's queued requests for autoscaling.

Not the controller's records of a deployment (what Ray's ``deployment_state.py`` holds): those
live in ``controller/state.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from serve import _custom_routing
from serve._custom_routing import CustomRouting
from serve._exchange import Connection, ConnectionLost
from serve._models import DeploymentID, ReplicaInfo, ReplicaSet
from serve._policy import QueueLengths, backoff_s, probe_deadline_s
from serve.config import RequestRouterConfig
from serve.exceptions import ServeError

logger = logging.getLogger(__name__)

_WATCH_RETRY_MAX_S = 2.0


class StateListener(Protocol):
    """Who follows a deployment's state: every router of it in this process."""

    def on_replica_set(self, replica_set: ReplicaSet) -> None: ...
    def on_capacity(self) -> None: ...
    def on_closed(self, error: BaseException) -> None: ...
    def load(self) -> tuple[int, int]: ...


Watch = Callable[[DeploymentID], AsyncIterator[ReplicaSet]]
# (deployment, requests queued in this process's handles, requests made so far)
ReportLoad = Callable[[DeploymentID, float, int], Awaitable[None]]
DEFAULT_REPORT_INTERVAL_S = 10.0
# (replica, on_load(ongoing, acked), on_broken(connection, error)) -> a connection
OpenConnection = Callable[
    [ReplicaInfo, Callable[[int, int], None], Callable[[Any, ConnectionLost], None]], Connection
]


class RoutingState:
    """What one process knows about one deployment: replicas, their load, connections."""

    def __init__(
        self,
        deployment_id: DeploymentID,
        *,
        watch: Watch,
        open_connection: OpenConnection,
        local_host: str = "",
        report: ReportLoad | None = None,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
    ) -> None:
        self._watch_source = watch
        self._report = report
        self._report_interval_s = report_interval_s
        self._reporter: asyncio.Task[None] | None = None
        self._pushed_at = 0.0
        self._open_connection = open_connection
        self.local_host = local_host
        self.deployment_id = deployment_id
        self.replica_set: ReplicaSet | None = None
        self.routable: list[ReplicaInfo] = []
        self.queue_lens = QueueLengths()
        # A custom request router (request_router_config); None: power of two choices.
        self.custom: CustomRouting | None = None
        self._router_config: RequestRouterConfig | None = None
        self._replicas: dict[str, ReplicaInfo] = {}
        self._excluded: set[str] = set()  # broken or draining, until the controller drops them
        self._connections: dict[str, Connection] = {}
        self._probing: dict[str, asyncio.Task[None]] = {}
        # Held weakly (a dropped handle's router just goes away); a list of references, not a
        # WeakSet, because wake() walks it after every reply and WeakSet iteration is slow.
        self._listener_refs: list[weakref.ReferenceType[StateListener]] = []
        self._ready = asyncio.Event()
        self._version_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start following the controller's replica sets (on the home loop)."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(
                self._watch_loop(), name=f"router:watch:{self.deployment_id}"
            )

    def __repr__(self) -> str:
        return (
            f"RoutingState({self.deployment_id}, routable={len(self.routable)}, "
            f"connections={len(self._connections)})"
        )

    def subscribe(self, listener: StateListener) -> None:
        """Tell ``listener`` about every replica set (the current one at once), capacity
        change and the shutdown. Held weakly: a dropped handle's router just goes away."""
        if all(ref() is not listener for ref in self._listener_refs):
            self._listener_refs.append(weakref.ref(listener))
        if self.replica_set is not None:
            listener.on_replica_set(self.replica_set)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_version(self, version: int) -> None:
        """Wait until a replica set at least this new has been applied."""
        while self.replica_set is None or self.replica_set.version < version:
            self._version_waiters.append(fut := asyncio.get_running_loop().create_future())
            await fut

    async def _watch_loop(self) -> None:
        delay_s = 0.05
        while True:
            try:
                async for replica_set in self._watch_source(self.deployment_id):
                    self.apply(replica_set)
                    delay_s = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("Watching %s failed (%s); retrying", self.deployment_id, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, _WATCH_RETRY_MAX_S)

    def apply(self, replica_set: ReplicaSet) -> None:
        """Take a replica set from the controller (the watch, or a test)."""
        self.replica_set = replica_set
        now = time.monotonic()
        fresh = {r.replica_id: r for r in replica_set.replicas}
        for replica_id in self._replicas.keys() - fresh.keys():
            self.queue_lens.forget(replica_id)
            probe = self._probing.pop(replica_id, None)
            if probe is not None:
                probe.cancel()
        for replica_id in fresh.keys() - self._replicas.keys():
            # A replica that just became RUNNING has no load yet; its first admission answer
            # corrects this if another router got there first.
            self.queue_lens.report(replica_id, 0, now)
        self._replicas = fresh
        self._excluded &= fresh.keys()
        if replica_set.request_router != self._router_config:
            self._router_config = config = replica_set.request_router
            self.custom = None
            if config is not None and not config.is_default:
                self.custom = _custom_routing.build(
                    self.deployment_id, config, self.queue_lens, self.probe_now, self.local_host
                )
        self._recompute()
        for listener in self._listeners():
            listener.on_replica_set(replica_set)
        self._ready.set()
        if self._report is not None and self._reporter is None and replica_set.exists:
            self._reporter = asyncio.get_running_loop().create_task(
                self._report_loop(), name=f"router:report:{self.deployment_id}"
            )
        waiters, self._version_waiters = self._version_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _listeners(self) -> list[StateListener]:
        """The live listeners (dropping the references of those that are gone)."""
        alive = []
        stale = False
        for ref in self._listener_refs:
            listener = ref()
            if listener is None:
                stale = True
            else:
                alive.append(listener)
        if stale:
            self._listener_refs = [weakref.ref(listener) for listener in alive]
        return alive

    def _recompute(self) -> None:
        self.routable = [r for r in self._replicas.values() if r.replica_id not in self._excluded]
        if self.custom is not None:
            self.custom.update(self.routable)

    def exclude(self, replica_id: str) -> None:
        """Stop routing to a replica before the controller says so (it broke or is draining)."""
        if replica_id in self._replicas and replica_id not in self._excluded:
            self._excluded.add(replica_id)
            self._recompute()

    def connection(self, replica: ReplicaInfo) -> Connection:
        replica_id = replica.replica_id
        conn = self._connections.get(replica_id)
        if conn is None:
            queue_lens = self.queue_lens

            def on_load(ongoing: int, acked: int) -> None:
                queue_lens.report(replica_id, ongoing, time.monotonic(), acked)

            conn = self._open_connection(replica, on_load, self._on_broken)
            self._connections[replica_id] = conn
        return conn

    def _on_broken(self, conn: Connection, error: ConnectionLost) -> None:
        if self._connections.get(conn.replica_id) is conn:
            del self._connections[conn.replica_id]
        logger.debug("Dropping replica %s: %s", conn.replica_id, error)
        self.exclude(conn.replica_id)
        self.queue_lens.forget(conn.replica_id)
        self._spawn(conn.aclose(), f"router:close:{conn.replica_id}")
        self.wake()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _load(self) -> tuple[float, int]:
        queued = made = 0
        for listener in self._listeners():
            listener_queued, listener_made = listener.load()
            queued += listener_queued
            made += listener_made
        return float(queued), made

    async def _report_loop(self) -> None:
        """Report queued requests (autoscaling counts them) and requests made (metrics)."""
        assert self._report is not None
        while True:
            interval_s = self._report_interval_s
            if self.replica_set is not None and self.replica_set.metrics_interval_s > 0:
                interval_s = min(interval_s, self.replica_set.metrics_interval_s)
            await asyncio.sleep(interval_s)
            try:
                await self._report(self.deployment_id, *self._load())
            except Exception as exc:  # no controller right now: report again next time
                logger.debug("Reporting load of %s failed: %s", self.deployment_id, exc)

    def push_load(self) -> None:
        """A request waits and the deployment has no replica: tell the autoscaler now."""
        replica_set = self.replica_set
        now = time.monotonic()
        if (
            self._report is None
            or replica_set is None
            or not replica_set.autoscaling
            or self.routable
            or now - self._pushed_at < 0.1
        ):
            return
        self._pushed_at = now
        self._spawn(self._report(self.deployment_id, *self._load()), "router:push-load")

    def wake(self) -> None:
        """Capacity may have changed: let routers with waiting requests try again."""
        for listener in self._listeners():
            listener.on_capacity()

    def probe(self, replica: ReplicaInfo, failed_passes: int) -> None:
        if replica.replica_id in self._probing or self._closed:
            return
        task = asyncio.get_running_loop().create_task(
            self._probe(replica, probe_deadline_s(failed_passes)),
            name=f"router:probe:{replica.replica_id}",
        )
        self._probing[replica.replica_id] = task

    async def _probe(self, replica: ReplicaInfo, deadline_s: float) -> None:
        replica_id = replica.replica_id
        try:
            ongoing, accepting = await self.connection(replica).queue_length(deadline_s)
            if replica_id in self._replicas:
                if accepting:
                    self.queue_lens.report(replica_id, ongoing, time.monotonic())
                else:
                    self.exclude(replica_id)
        except (TimeoutError, ConnectionLost):
            pass  # no answer; a broken connection was already reported
        except Exception:
            logger.exception("Probing replica %s failed", replica_id)
        finally:
            if self._probing.get(replica_id) is asyncio.current_task():
                del self._probing[replica_id]
        self.wake()

    def backoff_s(self, failed_passes: int) -> float:
        """How long to wait before the next routing pass (request_router_config's backoff)."""
        config = self._router_config
        if config is None:
            return backoff_s(failed_passes)
        return backoff_s(
            failed_passes,
            initial_s=config.initial_backoff_s,
            multiplier=config.backoff_multiplier,
            maximum_s=config.max_backoff_s,
        )

    async def probe_now(self, replica: ReplicaInfo, deadline_s: float) -> int:
        """Ask one replica its ongoing requests (a custom router's probe); raises
        ConnectionLost if it cannot answer or drains (then it is no longer routed to)."""
        ongoing, accepting = await self.connection(replica).queue_length(deadline_s)
        if not accepting:
            self.exclude(replica.replica_id)
            raise ConnectionLost(f"replica {replica.replica_id} is draining")
        self.queue_lens.report(replica.replica_id, ongoing, time.monotonic())
        return ongoing

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        tasks = [
            *([self._watch] if self._watch else []),
            *([self._reporter] if self._reporter else []),
            *self._probing.values(),
            *self._tasks,
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        conns = list(self._connections.values())
        self._connections.clear()
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        error = ServeError("Serve was shut down; this handle can no longer be used.")
        for listener in self._listeners():
            listener.on_closed(error)
