"""The controller's thin async shell: performs the state machine's actions, reports outcomes.

Everything runs on the controller's loop. Each step feeds one event to ``ControllerMachine``,
performs the actions it returns (launching processes, replica RPCs in owned tasks, store writes
on the store's writer thread), then derives what to publish: every deployment's replica set is
diffed with the last published one, and status waiters wake when the status changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

from controller.autoscale import LoadSource
from controller.events import (
    Action,
    AppDeleteRequested,
    AppDeployed,
    Call,
    CallDone,
    CheckHealth,
    DeleteApp,
    Event,
    Forget,
    Initialize,
    Kill,
    Launch,
    LaunchFailed,
    LaunchGang,
    LinkEnded,
    LinkVerdict,
    LoadReported,
    MarkDeleting,
    ModelsReported,
    PersistApp,
    PreviousReplica,
    Reconfigure,
    ReplicaExited,
    ReplicaLaunched,
    ReplicaLinked,
    ReplicaPending,
    Restored,
    RoutingStatsReported,
    SaveReplica,
    ShutdownRequested,
    Stop,
    Tick,
    Verdict,
)
from controller.launcher import Launched, Launcher
from controller.load import LoadBook
from controller.machine import SETTLED, ControllerMachine
from controller.metrics import Snapshot
from controller.publisher import Publisher
from controller.resources import GangSpec, ResourceRequest
from controller.state import AppGoal, DeploymentView, Phase, ReplicaRecord
from controller.store import GoalStore
from controller.views import metrics_snapshot, replica_sets, status_key
from serve._models import (
    ApplicationStatus,
    CodeEnv,
    DeploymentID,
    DeploymentSpec,
    Failure,
    Route,
)
from serve._rpc.channel import TlsFiles
from serve._rpc.replica_client import ReplicaClient, ReplicaUnreachable
from serve._task_owner import TaskOwner
from serve.config import AutoscalingPolicy

logger = logging.getLogger(__name__)

TICK_S = 0.1  # how often time passes for the state machine (health checks are due on ticks)
EXIT_MARGIN_S = 5.0  # after a Stop call, how long the process may take to exit


class RouteConflict(ValueError):
    """Another application already serves the route prefix an application asked for."""


class Supervisor:
    """Owns the state machine, the replica processes and clients, and the tasks that run them."""

    def __init__(
        self,
        *,
        store: GoalStore,
        launcher: Launcher,
        token: str,
        tls: TlsFiles | None,
        connect: Callable[[str], ReplicaClient] | None = None,
    ) -> None:
        self._load = LoadBook()
        self.machine = ControllerMachine(autoscaler=self._load)
        self.publisher = Publisher()
        self._store = store
        self._launcher = launcher
        self._connect = connect or (lambda address: ReplicaClient(address, token=token, tls=tls))
        self._processes: dict[str, Launched] = {}
        self._clients: dict[str, ReplicaClient] = {}
        self._links: dict[str, asyncio.Event] = {}
        self._saved: dict[str, asyncio.Future[None]] = {}  # each replica's last record write
        self._status_event = asyncio.Event()
        self._status_key: object = None
        # Every task (replica calls, launches, watches, the reconcile ticks): one TaskGroup's.
        self._tasks = TaskOwner("controller:tasks", logger)
        self._closed = False
        self.loop_duration_s = 0.0
        self.loops = 0

    # Lifecycle.

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(stop_replicas=False)

    async def start(self) -> None:
        """Restore the goal state and the last controller's replicas, then start ticking."""
        await self._tasks.start()
        try:
            await self._restore()
        except BaseException:
            await self._tasks.aclose()
            raise
        self._spawn(self._tick_loop(), "controller:reconcile")

    async def _restore(self) -> None:
        apps = await self._store.load()
        previous = []
        for replica_id, pid, code_version, request in await self._store.load_replicas():
            found = await self._launcher.adopt(replica_id, pid, ResourceRequest.from_json(request))
            if found is not None:
                self._watch(replica_id, found)
            previous.append(PreviousReplica(replica_id, pid, code_version, found is not None))
        self._feed(Restored(tuple(apps), tuple(previous)))

    async def aclose(self, *, stop_replicas: bool, timeout_s: float = 30.0) -> None:
        """Stop supervising; with ``stop_replicas``, stop every replica first. Idempotent."""
        if self._closed:
            return
        if stop_replicas:
            self._feed(ShutdownRequested())
            try:
                async with asyncio.timeout(timeout_s):
                    while self.machine.replicas:
                        await self._status_event.wait()
            except TimeoutError:
                logger.warning("Replicas still running at shutdown; killing them")
            for record in list(self.machine.replicas.values()):
                self._kill(record.replica_id, record.pid)
            await self._wait_killed(timeout_s=10.0)
        self._closed = True
        await self._tasks.aclose()
        for event in self._links.values():
            event.set()
        await asyncio.gather(*(c.aclose() for c in self._clients.values()), return_exceptions=True)
        self._clients.clear()
        await self._launcher.aclose()

    async def _wait_killed(self, timeout_s: float) -> None:
        """After a shutdown's kills: wait (bounded) until the launcher saw every one end."""
        ending = list(self._processes.values())
        if not ending:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(p.wait() for p in ending))
        except TimeoutError:
            logger.warning("%d replica(s) not confirmed gone at shutdown", len(ending))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)  # closed unrun once aclose() began: nobody would await it

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._feed(Tick())
            except Exception:
                logger.exception("Reconcile step failed")

    # One step: event in, actions performed, publication derived.

    def _feed(self, event: Event) -> tuple[list[Action], list[asyncio.Future[None]]]:
        started = time.perf_counter()
        try:
            actions = self.machine.handle(event, time.monotonic())
            writes = [w for w in (self._perform(a) for a in actions) if w is not None]
            if self.machine.recovered:
                self.publisher.update(
                    replica_sets(self.machine.goals(), self.machine.replicas.values())
                )
            key = status_key(self.machine.apps.values(), self.machine.replicas.values())
            if key != self._status_key:
                self._status_key = key
                event_, self._status_event = self._status_event, asyncio.Event()
                event_.set()
            return actions, writes
        finally:
            self.loops += 1
            self.loop_duration_s = time.perf_counter() - started

    def _perform(self, action: Action) -> asyncio.Future[None] | None:
        """Start doing one action; a store write's future (already being logged on failure)."""
        match action:
            case Launch():
                self._spawn(
                    self._launch(action.replica_id, action.request),
                    f"controller:launch:{action.replica_id}",
                )
            case LaunchGang():
                self._spawn(
                    self._launch_gang(action.gang, action.request),
                    f"controller:launch-gang:{action.gang.gang_id}",
                )
            case Initialize():
                self._call(action.replica_id, action.address, Call.INITIALIZE, _initializer(action))
            case Reconfigure():
                config, changed = action.config, action.user_config_changed
                self._call(
                    action.replica_id,
                    action.address,
                    Call.RECONFIGURE,
                    lambda c: c.reconfigure(config, user_config_changed=changed),
                )
            case CheckHealth():
                timeout_s = action.timeout_s
                self._call(
                    action.replica_id,
                    action.address,
                    Call.CHECK_HEALTH,
                    lambda c: c.check_health(timeout_s),
                )
            case Stop():
                self._spawn(self._stop(action), f"controller:stop:{action.replica_id}")
            case Kill():
                self._kill(action.replica_id, action.pid)
            case Forget():
                self._release(action.replica_id)
                return self._write(self._store.forget_replica(action.replica_id))
            case SaveReplica():
                saved = self._write(
                    self._store.save_replica(
                        action.replica_id, action.pid, action.code_version, action.request.to_json()
                    )
                )
                self._saved[action.replica_id] = saved
                return saved
            case PersistApp():
                return self._write(self._store.save(action.app))
            case MarkDeleting():
                return self._write(self._store.mark_deleting(action.app_name))
            case DeleteApp():
                return self._write(self._store.delete(action.app_name))
            case LinkVerdict():
                pass  # answered by link()
        return None

    def _write(self, future: asyncio.Future[None]) -> asyncio.Future[None]:
        future.add_done_callback(_log_write_failure)
        return future

    # Replica processes.

    def _pending(self, replica_ids: Sequence[str]) -> Callable[[str], None]:
        def on_pending(reason: str) -> None:
            if not self._closed:
                for replica_id in replica_ids:
                    self._feed(ReplicaPending(replica_id, reason))

        return on_pending

    async def _saved_first(self, replica_ids: Sequence[str]) -> None:
        """On disk before it runs: a restart re-adopts it, never doubles it."""
        saved = [self._saved[r] for r in replica_ids if r in self._saved]
        with contextlib.suppress(Exception):  # a failed write is logged; launch anyway
            await asyncio.shield(asyncio.gather(*saved))

    async def _launch(self, replica_id: str, request: ResourceRequest) -> None:
        await self._saved_first([replica_id])
        try:
            process = await self._launcher.launch(replica_id, request, self._pending([replica_id]))
        except Exception as exc:
            logger.exception("Could not launch replica %s", replica_id)
            self._feed(LaunchFailed(replica_id, str(exc)))
            return
        await self._follow(replica_id, process)

    async def _launch_gang(self, gang: GangSpec, request: ResourceRequest) -> None:
        await self._saved_first(gang.members)
        try:
            members = await self._launcher.launch_gang(gang, request, self._pending(gang.members))
        except Exception as exc:
            logger.exception("Could not launch gang %s", gang.gang_id)
            for replica_id in gang.members:
                self._feed(LaunchFailed(replica_id, str(exc)))
            return
        await asyncio.gather(
            *(
                self._follow(replica_id, m)
                for replica_id, m in zip(gang.members, members, strict=True)
            )
        )

    async def _follow(self, replica_id: str, process: Launched) -> None:
        """Report a launched replica's start and its end."""
        self._processes[replica_id] = process
        pid = await process.running()
        if pid is not None:
            self._feed(ReplicaLaunched(replica_id, pid))
        ended = await process.wait()
        self._feed(ReplicaExited(replica_id, ended.code, ended.reason, ended.node))

    def _watch(self, replica_id: str, process: Launched) -> None:
        """A replica this controller did not launch: report its exit like a launched one's."""
        self._processes[replica_id] = process

        async def watch() -> None:
            ended = await process.wait()
            if self._processes.get(replica_id) is process:
                self._feed(ReplicaExited(replica_id, ended.code, ended.reason, ended.node))

        self._spawn(watch(), f"controller:watch:{replica_id}")

    def _call(
        self,
        replica_id: str,
        address: str,
        call: Call,
        rpc: Callable[[ReplicaClient], Awaitable[Failure | None]],
    ) -> None:
        """The one path of every replica RPC: call, turn unreachability into a failure, report."""

        async def run() -> None:
            try:
                failure = await rpc(self._client(replica_id, address))
            except ReplicaUnreachable as exc:
                failure = Failure(str(exc))
            self._feed(CallDone(replica_id, call, failure))

        self._spawn(run(), f"controller:{call.value}:{replica_id}")

    async def _stop(self, action: Stop) -> None:
        replica_id = action.replica_id
        if action.address:
            try:
                abandoned = await self._client(replica_id, action.address).stop(action.timeout_s)
                if abandoned:
                    logger.warning(
                        "Replica %s stopped with %d request(s) unfinished", replica_id, abandoned
                    )
            except ReplicaUnreachable:
                pass
        process = self._processes.get(replica_id)
        if process is None and action.pid:  # re-linked without being adopted at start
            process = await self._launcher.adopt(replica_id, action.pid, self._request(replica_id))
            if process is None:
                self._feed(ReplicaExited(replica_id, None, "gone before it was stopped"))
                return
            self._watch(replica_id, process)
        if process is not None:  # its exit is reported by the task that launched or watches it
            if action.address:  # drained by the Stop call: it exits by itself
                try:
                    async with asyncio.timeout(EXIT_MARGIN_S):
                        await process.wait()
                    return
                except TimeoutError:
                    pass
            await process.stop(grace_s=0.5)

    def _kill(self, replica_id: str, pid: int) -> None:
        """Kill now; the exit is reported by the task that launched or watches the replica."""
        process = self._processes.get(replica_id)
        if process is not None:
            process.kill()
        elif pid:
            self._spawn(self._kill_unknown(replica_id, pid), f"controller:kill:{replica_id}")

    async def _kill_unknown(self, replica_id: str, pid: int) -> None:
        """A replica that re-linked without being adopted at start: find it, then kill it."""
        process = await self._launcher.adopt(replica_id, pid, self._request(replica_id))
        if process is None:
            self._feed(ReplicaExited(replica_id, None, "gone before it was killed"))
            return
        self._watch(replica_id, process)
        process.kill()

    def _request(self, replica_id: str) -> ResourceRequest:
        record = self.machine.replicas.get(replica_id)
        return record.request if record is not None else ResourceRequest()

    def _client(self, replica_id: str, address: str) -> ReplicaClient:
        client = self._clients.get(replica_id)
        if client is None:
            client = self._connect(address)
            self._clients[replica_id] = client
        return client

    def _release(self, replica_id: str) -> None:
        self._processes.pop(replica_id, None)
        self._saved.pop(replica_id, None)
        link = self._links.pop(replica_id, None)
        if link is not None:
            link.set()
        client = self._clients.pop(replica_id, None)
        if client is not None:
            self._spawn(client.aclose(), f"controller:close:{replica_id}")

    # What the servicer calls.

    @property
    def apps(self) -> dict[str, AppGoal]:
        return self.machine.apps

    @property
    def replicas(self) -> dict[str, ReplicaRecord]:
        return self.machine.replicas

    @property
    def load_sources(self) -> dict[DeploymentID, dict[str, LoadSource]]:
        """What each replica and each process's handles last reported (the dashboard reads
        it; the load book owns it)."""
        return self._load.sources

    def deployment_views(self, app: AppGoal) -> dict[str, DeploymentView]:
        return self.machine.deployment_views(app)

    def app_status(self, app: AppGoal) -> tuple[ApplicationStatus, str]:
        return self.machine.app_status(app)

    async def deploy(
        self,
        *,
        app_name: str,
        route_prefix: str | None,
        ingress: str,
        specs: Sequence[DeploymentSpec],
        code_env: CodeEnv,
        config_json: str = "",
        autoscaling_policy: AutoscalingPolicy | None = None,
    ) -> None:
        """Replace an application's goal; returns once it is durable.

        Raises RouteConflict if another application (not being deleted) has ``route_prefix``.
        """
        for other in self.machine.apps.values():
            if (
                route_prefix is not None
                and other.name != app_name
                and not other.deleting
                and other.route_prefix == route_prefix
            ):
                raise RouteConflict(
                    f'Prefix {route_prefix} is being used by application "{other.name}". '
                    f'Failed to deploy application "{app_name}".'
                )
        event = AppDeployed(
            app_name,
            route_prefix,
            ingress,
            tuple(specs),
            code_env,
            time.time(),
            config_json,
            autoscaling_policy,
        )
        _, writes = self._feed(event)
        await asyncio.shield(asyncio.gather(*writes))  # the state already moved on: finish

    async def delete(self, app_name: str, *, wait: bool) -> bool:
        app = self.machine.apps.get(app_name)
        if app is None:
            return False
        _, writes = self._feed(AppDeleteRequested(app_name))
        await asyncio.shield(asyncio.gather(*writes))
        while wait and self.machine.apps.get(app_name) is app:
            await self._status_event.wait()
        return True

    async def wait_application(self, app_name: str, timeout_s: float) -> AppGoal | None:
        """Return once the application settles (or is gone), or when ``timeout_s`` passes."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                while True:
                    app = self.machine.apps.get(app_name)
                    if app is None or self.machine.app_status(app)[0] in SETTLED:
                        return app
                    await self._status_event.wait()
        except TimeoutError:
            return self.machine.apps.get(app_name)

    def link(
        self,
        *,
        replica_id: str,
        address: str,
        pid: int,
        host: str,
        initialized: bool,
        code_version: str,
        user_config_json: bytes,
        draining: bool = False,
        gang_id: str = "",
        gang_rank: int = -1,
        gang_members: tuple[str, ...] = (),
        ingress_http_address: str = "",
        ingress_grpc_address: str = "",
    ) -> tuple[Verdict, asyncio.Event | None]:
        """A replica linked (or re-linked; a gang member says its gang, so a restarted
        controller keeps gangs whole). Returns the verdict and an event ending the link."""
        event = ReplicaLinked(
            replica_id,
            address,
            pid,
            host,
            initialized,
            code_version,
            user_config_json,
            draining,
            gang_id,
            gang_rank,
            gang_members,
            ingress_http_address,
            ingress_grpc_address,
        )
        actions, _ = self._feed(event)
        verdict = next((a.verdict for a in actions if isinstance(a, LinkVerdict)), Verdict.STOP)
        if verdict is Verdict.STOP:
            return verdict, None
        ended = self._links[replica_id] = asyncio.Event()
        return verdict, ended

    def unlink(self, replica_id: str, ended: asyncio.Event) -> None:
        """A replica's link ended (for replicas this process did not launch, that is death)."""
        if self._closed:
            return  # the controller is going away; its replicas keep serving
        if self._links.get(replica_id) is ended:
            del self._links[replica_id]
        self._feed(LinkEnded(replica_id))

    def routes(self) -> list[Route]:
        """Where each application is served (applications being deleted are not). One without
        a route prefix has ``""``: served over gRPC, not HTTP, as in Ray."""
        routes = [
            Route(app.route_prefix or "", app.name, app.ingress)
            for app in self.machine.apps.values()
            if not app.deleting
        ]
        return sorted(routes, key=lambda r: r.route_prefix)

    def replica_nodes(self) -> set[str] | None:
        """The nodes that run replicas (not stopping), as the replicas said when they linked;
        None while replicas of the last controller may still re-link (nobody knows yet)."""
        if not self.machine.recovered:
            return None
        return {
            r.host
            for r in self.machine.replicas.values()
            if r.host and r.phase is not Phase.STOPPING
        }

    async def status_changed(self) -> None:
        """Return at the next change of any application's or replica's status."""
        await self._status_event.wait()

    def report_models(self, replica_id: str, model_ids: frozenset[str]) -> None:
        """A replica's multiplexed models changed: routers learn it with the next set."""
        self._feed(ModelsReported(replica_id, model_ids))

    def report_routing_stats(self, replica_id: str, stats_json: bytes) -> None:
        """A replica's record_routing_stats(): routers get it with the next replica set."""
        self._feed(RoutingStatsReported(replica_id, stats_json))

    def report_load(self, event: LoadReported) -> None:
        """Load from replicas (running) and handles (queued): for autoscaling and metrics."""
        self._feed(event)

    def metrics_snapshot(self) -> Snapshot:
        """What /metrics shows, taken at once (on the loop)."""
        return metrics_snapshot(
            apps=self.machine.apps.values(),
            replicas=self.machine.replicas,
            sources=self._load.sources,
            replica_starts=self.machine.replica_starts,
            loop_duration_s=self.loop_duration_s,
            loops=self.loops,
        )


def _initializer(action: Initialize) -> Callable[[ReplicaClient], Awaitable[Failure | None]]:
    async def initialize(client: ReplicaClient) -> Failure | None:
        failure = await client.initialize(
            action.app_name, action.spec, action.code_env, action.rank, action.world_size
        )
        if failure is None:  # a replica is only running once it reports healthy
            failure = await client.check_health(action.health_check_timeout_s)
            if failure is not None:
                failure = dataclasses.replace(failure, health_check=True)
        return failure

    return initialize


def _log_write_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("Could not write the state database", exc_info=future.exception())
