"""The controller's engine: applies ``state.plan`` and publishes replica sets.

Everything runs on the controller's loop. Replica transitions happen synchronously in the loop
(so ``plan`` always sees a consistent picture); the I/O behind them (launching, Initialize, Stop)
runs in owned tasks that report back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

from controller.health import HealthChecker
from controller.launcher import LocalProcessLauncher, ReplicaProcess, kill_pid
from controller.load import LoadTracker
from controller.publisher import Publisher
from controller.state import (
    AppGoal,
    DeploymentGoal,
    DeploymentView,
    Phase,
    ReconfigureReplica,
    ReplicaRecord,
    StartReplicas,
    StopReplica,
    application_status,
    deployment_status,
    needs_reconfigure,
    plan,
)
from controller.store import GoalStore
from serve._models import (
    ApplicationStatus,
    CodeEnv,
    DeploymentID,
    DeploymentSpec,
    Failure,
    ReplicaID,
)
from serve._rpc.channel import TlsFiles
from serve._rpc.replica_client import ReplicaClient, ReplicaUnreachable

logger = logging.getLogger(__name__)

TICK_S = 1.0
RECOVERY_WAIT_S = (
    5.0  # after a restart, how long replicas of the last controller may take to re-link
)
LINK_TIMEOUT_S = 60.0  # a launched replica that has not linked by then is replaced
EXIT_MARGIN_S = 5.0  # after a Stop call, how long the process may take to exit
SETTLED = (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)


class LinkVerdict:
    ACCEPTED = "accepted"
    STOP = "stop"


class Controller:
    """Goal state, replica records, and the tasks that reconcile them."""

    def __init__(
        self,
        *,
        store: GoalStore,
        launcher: LocalProcessLauncher,
        token: str,
        tls: TlsFiles | None,
    ) -> None:
        self.apps: dict[str, AppGoal] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        self._store = store
        self._launcher = launcher
        self._token = token
        self._tls = tls
        self._processes: dict[str, ReplicaProcess] = {}
        self._clients: dict[str, ReplicaClient] = {}
        self._links: dict[str, asyncio.Event] = {}
        self._status_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.recovered = asyncio.Event()
        self.replica_starts: dict[DeploymentID, int] = {}
        self.loop_duration_s = 0.0
        self.loops = 0
        self._loop_task: asyncio.Task[None] | None = None
        self.publisher = Publisher(self)
        self.load = LoadTracker(self)
        self.health = HealthChecker(self)

    # Lifecycle.

    async def start(self) -> None:
        for app in self._store.load():
            self.apps[app.name] = app
        if self.apps:
            logger.info("Recovered %d application(s) from the state directory", len(self.apps))
        self._expect_previous_replicas()
        self._loop_task = asyncio.create_task(self._reconcile_loop(), name="controller:reconcile")
        self.spawn(self.health.run(), "controller:health")

    def _expect_previous_replicas(self) -> None:
        """Replicas the last controller ran, still alive, are expected to re-link (re-adopted).

        Until they do (or RECOVERY_WAIT_S passes), they count towards their deployment's
        target, so no duplicates start, and no replica set is published, so routers keep
        routing on what they knew instead of seeing a half-empty set.
        """
        now = time.monotonic()
        for replica_id, pid, code_version in self._store.load_replicas():
            try:
                deployment_id = ReplicaID.parse(replica_id).deployment_id
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, PermissionError):
                self._store.forget_replica(replica_id)
                continue
            self.replicas[replica_id] = ReplicaRecord(
                replica_id=replica_id,
                deployment_id=deployment_id,
                code_version=code_version,
                phase=Phase.RECOVERING,
                started_at_s=now,
                pid=pid,
            )
        if self.replicas:
            logger.info("Waiting for %d replica(s) to re-link", len(self.replicas))
        else:
            self.recovered.set()

    def _check_recovery(self, now: float) -> None:
        if self.recovered.is_set():
            return
        recovering = [r for r in self.replicas.values() if r.phase is Phase.RECOVERING]
        if recovering and now - recovering[0].started_at_s < RECOVERY_WAIT_S:
            return
        for record in recovering:
            logger.warning("Replica %s did not re-link; stopping it", record.replica_id)
            kill_pid(record.pid)
            self._forget(record.replica_id)
        self.recovered.set()
        for app in self.apps.values():
            for name in app.deployments:
                self.publisher.publish(DeploymentID(name, app.name))
        self.changed()

    async def aclose(self, *, stop_replicas: bool, timeout_s: float = 30.0) -> None:
        """Stop reconciling; with ``stop_replicas``, stop every replica first."""
        if stop_replicas:
            for app in self.apps.values():
                app.deleting = True
            self._wake.set()
            try:
                async with asyncio.timeout(timeout_s):
                    while self.replicas:
                        await self._wait_status_change()
            except TimeoutError:
                logger.warning("Replicas still running at shutdown; killing them")
            for record in list(self.replicas.values()):
                self._kill(record)
        if self._loop_task is not None:
            self._loop_task.cancel()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(
            *([self._loop_task] if self._loop_task else []), *tasks, return_exceptions=True
        )
        for event in self._links.values():
            event.set()
        await asyncio.gather(*(c.aclose() for c in self._clients.values()), return_exceptions=True)
        self._clients.clear()

    def spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(TICK_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                self._step()
            except Exception:
                logger.exception("Reconcile step failed")

    def _wake_up(self) -> None:
        self._wake.set()

    # Goal state.

    def goals(self) -> dict[DeploymentID, DeploymentGoal]:
        return {
            goal.deployment_id: goal
            for app in self.apps.values()
            if not app.deleting
            for goal in app.deployments.values()
        }

    def goal(self, deployment_id: DeploymentID) -> DeploymentGoal | None:
        app = self.apps.get(deployment_id.app_name)
        if app is None or app.deleting:
            return None
        return app.deployments.get(deployment_id.name)

    def _graceful_timeout_s(self, deployment_id: DeploymentID) -> float:
        """The deployment's graceful_shutdown_timeout_s, also while its app is being deleted."""
        app = self.apps.get(deployment_id.app_name)
        goal = app.deployments.get(deployment_id.name) if app is not None else None
        return goal.spec.config.graceful_shutdown_timeout_s if goal is not None else 20.0

    def deploy(
        self,
        *,
        app_name: str,
        route_prefix: str | None,
        ingress: str,
        specs: Sequence[DeploymentSpec],
        code_env: CodeEnv,
    ) -> None:
        """Replace an application's goal; durable before this returns."""
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"Duplicate deployment names in application {app_name!r}: {names}")
        if ingress not in names:
            raise ValueError(f"Ingress {ingress!r} is not one of the deployments {names}")
        previous = self.apps.get(app_name)
        goals: dict[str, DeploymentGoal] = {}
        for spec in specs:
            old = (
                previous.deployments.get(spec.name) if previous and not previous.deleting else None
            )
            target = spec.config.initial_replicas()
            if old is not None and spec.config.autoscaling_config is not None:
                auto = spec.config.autoscaling_config
                if old.spec.config.autoscaling_config is not None:
                    target = min(max(old.target_replicas, auto.min_replicas), auto.max_replicas)
            goal = DeploymentGoal(DeploymentID(spec.name, app_name), spec, target)
            if old is not None and old.version == spec.code_version:
                goal.ever_running = old.ever_running
            goals[spec.name] = goal
        app = AppGoal(
            name=app_name,
            ingress=ingress,
            route_prefix=route_prefix,
            code_env=code_env,
            deployments=goals,
            deployed_at_s=time.time(),
        )
        self._store.save(app)
        self.apps[app_name] = app
        for deployment_id in {g.deployment_id for g in goals.values()} | {
            DeploymentID(n, app_name) for n in (previous.deployments if previous else {})
        }:
            self.publisher.publish(deployment_id)
        logger.info("Deploying application %r: %s", app_name, sorted(goals))
        self.changed()

    async def delete(self, app_name: str, *, wait: bool) -> bool:
        app = self.apps.get(app_name)
        if app is None:
            return False
        if not app.deleting:
            app.deleting = True
            self._store.mark_deleting(app_name)
            for name in app.deployments:
                self.publisher.publish(DeploymentID(name, app_name))
            logger.info("Deleting application %r", app_name)
            self.changed()
        while wait and self.apps.get(app_name) is app:
            await self._wait_status_change()
        return True

    def changed(self) -> None:
        """Something changed: re-plan and wake status waiters."""
        self._wake.set()
        event, self._status_event = self._status_event, asyncio.Event()
        event.set()

    async def _wait_status_change(self) -> None:
        await self._status_event.wait()

    # Status.

    def deployment_views(self, app: AppGoal) -> dict[str, DeploymentView]:
        views = {}
        for name, goal in app.deployments.items():
            records = [r for r in self.replicas.values() if r.deployment_id == goal.deployment_id]
            views[name] = deployment_status(goal, records)
        return views

    def app_status(self, app: AppGoal) -> tuple[ApplicationStatus, str]:
        return application_status(app, self.deployment_views(app))

    async def wait_application(self, app_name: str, timeout_s: float) -> AppGoal | None:
        """Return once the application settles (or is gone), or when ``timeout_s`` passes."""
        try:
            async with asyncio.timeout(max(timeout_s, 0.0)):
                while True:
                    app = self.apps.get(app_name)
                    if app is None or self.app_status(app)[0] in SETTLED:
                        return app
                    await self._wait_status_change()
        except TimeoutError:
            return self.apps.get(app_name)

    # Reconciliation.

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            self._step_once()
        finally:
            self.loops += 1
            self.loop_duration_s = time.perf_counter() - started

    def _step_once(self) -> None:
        now = time.monotonic()
        self._check_recovery(now)
        self.load.prune(now)
        for deployment_id in list(self.goals()):
            self.load.autoscale(deployment_id, now)
        for late in list(self.replicas.values()):
            if late.phase is Phase.STARTING and now - late.started_at_s > LINK_TIMEOUT_S:
                self._fail_start(
                    late, Failure(f"replica did not start within {LINK_TIMEOUT_S:.0f}s")
                )
        for action in plan(self.goals(), list(self.replicas.values())):
            if isinstance(action, StartReplicas):
                for _ in range(action.count):
                    self._start(action.deployment_id)
            elif isinstance(action, StopReplica):
                stopping = self.replicas.get(action.replica_id)
                if stopping is not None:
                    self.begin_stop(stopping)
            elif isinstance(action, ReconfigureReplica):
                changing = self.replicas.get(action.replica_id)
                if changing is not None:
                    self._begin_reconfigure(changing)
        for name, app in list(self.apps.items()):
            if app.deleting and not any(
                r.deployment_id.app_name == name for r in self.replicas.values()
            ):
                del self.apps[name]
                self._store.delete(name)
                for dep in app.deployments:
                    self.publisher.forget(DeploymentID(dep, name))
                    self.publisher.publish(DeploymentID(dep, name))
                logger.info("Application %r deleted", name)
                self.changed()

    def _start(self, deployment_id: DeploymentID) -> None:
        goal = self.goal(deployment_id)
        assert goal is not None
        replica_id = str(ReplicaID.new(deployment_id))
        record = ReplicaRecord(
            replica_id=replica_id,
            deployment_id=deployment_id,
            code_version=goal.version,
            phase=Phase.STARTING,
            started_at_s=time.monotonic(),
        )
        self.replicas[replica_id] = record
        self.replica_starts[deployment_id] = self.replica_starts.get(deployment_id, 0) + 1
        self.spawn(self._launch(record), f"controller:launch:{replica_id}")
        self.changed()

    async def _launch(self, record: ReplicaRecord) -> None:
        try:
            process = await self._launcher.launch(record.replica_id)
        except Exception as exc:
            logger.exception("Could not launch replica %s", record.replica_id)
            self._fail_start(record, Failure(f"could not launch the replica process: {exc}"))
            return
        record.pid = process.pid
        self._processes[record.replica_id] = process
        self._store.save_replica(record.replica_id, process.pid, record.code_version)
        logger.info("Started replica %s (pid %d)", record.replica_id, process.pid)
        code = await process.wait()
        self._on_exit(record, code)

    def _on_exit(self, record: ReplicaRecord, code: int) -> None:
        replica_id = record.replica_id
        if self.replicas.get(replica_id) is not record:
            self._forget(replica_id)
            return
        if record.phase is not Phase.STOPPING:
            logger.warning("Replica %s exited unexpectedly (code %s)", replica_id, code)
            if record.phase in (Phase.STARTING, Phase.INITIALIZING):
                self._count_failure(
                    record,
                    Failure(
                        f"the replica process exited with code {code} while starting; see "
                        "its log for the reason"
                    ),
                )
        self._forget(replica_id)
        self.publisher.publish(record.deployment_id)
        self.changed()

    def _forget(self, replica_id: str) -> None:
        if self.replicas.pop(replica_id, None) is not None:
            self._store.forget_replica(replica_id)
        self._processes.pop(replica_id, None)
        link = self._links.pop(replica_id, None)
        if link is not None:
            link.set()
        client = self._clients.pop(replica_id, None)
        if client is not None:
            self.spawn(client.aclose(), f"controller:close:{replica_id}")

    def client_for(self, record: ReplicaRecord) -> ReplicaClient:
        client = self._clients.get(record.replica_id)
        if client is None:
            client = ReplicaClient(record.address, token=self._token, tls=self._tls)
            self._clients[record.replica_id] = client
        return client

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
    ) -> tuple[str, asyncio.Event | None]:
        """A replica linked (or re-linked). Returns the verdict and an event ending the link."""
        record = self.replicas.get(replica_id)
        if record is not None and record.phase is Phase.RECOVERING:
            del self.replicas[replica_id]  # re-adopted below, or told to stop
            record = None
        if record is None:
            if draining:
                return LinkVerdict.STOP, None
            return self._adopt(
                replica_id, address, pid, host, initialized, code_version, user_config_json
            )
        record.address, record.pid, record.host = address, pid, host
        if record.phase is Phase.STARTING:
            record.phase = Phase.INITIALIZING
            self.spawn(self._initialize(record), f"controller:init:{replica_id}")
            self.changed()
        event = self._links[replica_id] = asyncio.Event()
        return LinkVerdict.ACCEPTED, event

    def _adopt(
        self,
        replica_id: str,
        address: str,
        pid: int,
        host: str,
        initialized: bool,
        code_version: str,
        user_config_json: bytes,
    ) -> tuple[str, asyncio.Event | None]:
        """A replica this controller did not start (it restarted): keep it if still wanted."""
        try:
            deployment_id = ReplicaID.parse(replica_id).deployment_id
        except ValueError:
            return LinkVerdict.STOP, None
        goal = self.goal(deployment_id)
        if goal is None or not initialized or goal.version != code_version:
            logger.info("Replica %s is not part of the goal state; telling it to stop", replica_id)
            return LinkVerdict.STOP, None
        record = ReplicaRecord(
            replica_id=replica_id,
            deployment_id=deployment_id,
            code_version=code_version,
            phase=Phase.RUNNING,
            started_at_s=time.monotonic(),
            pid=pid,
            address=address,
            host=host,
            user_config_json=user_config_json or None,
            max_ongoing_requests=goal.max_ongoing_requests,
        )
        self.replicas[replica_id] = record
        self._store.save_replica(replica_id, pid, code_version)
        record.next_health_check_s = time.monotonic() + goal.spec.config.health_check_period_s
        goal.ever_running = True
        logger.info("Re-adopted replica %s (pid %d)", replica_id, pid)
        if not any(r.phase is Phase.RECOVERING for r in self.replicas.values()):
            self._check_recovery(time.monotonic())
        self.publisher.publish(deployment_id)
        self.changed()
        event = self._links[replica_id] = asyncio.Event()
        return LinkVerdict.ACCEPTED, event

    def unlink(self, replica_id: str, event: asyncio.Event) -> None:
        """A replica's link ended. For replicas this process did not launch, that is death."""
        if self._links.get(replica_id) is event:
            del self._links[replica_id]
        record = self.replicas.get(replica_id)
        if record is not None and replica_id not in self._processes and record.pid:
            if record.phase is not Phase.STOPPING:
                logger.warning("Lost the link to re-adopted replica %s; replacing it", replica_id)
            kill_pid(record.pid)
            self._forget(replica_id)
            self.publisher.publish(record.deployment_id)
            self.changed()

    async def _initialize(self, record: ReplicaRecord) -> None:
        app = self.apps.get(record.deployment_id.app_name)
        goal = self.goal(record.deployment_id)
        if app is None or goal is None or goal.version != record.code_version:
            self.begin_stop(record)
            return
        config = goal.spec.config
        try:
            failure = await self.client_for(record).initialize(app.name, goal.spec, app.code_env)
            if failure is None:  # a replica is only running once it reports healthy
                failure = await self.client_for(record).check_health(config.health_check_timeout_s)
        except ReplicaUnreachable as exc:
            failure = Failure(str(exc))
        if (
            self.replicas.get(record.replica_id) is not record
            or record.phase is not Phase.INITIALIZING
        ):
            return
        if failure is not None:
            logger.warning(
                "Replica %s failed to initialize: %s", record.replica_id, failure.message
            )
            self._fail_start(record, failure)
            return
        record.phase = Phase.RUNNING
        record.user_config_json = goal.user_config_json
        record.max_ongoing_requests = goal.max_ongoing_requests
        record.next_health_check_s = time.monotonic() + config.health_check_period_s
        if goal.version == record.code_version:
            goal.ever_running = True
            goal.failures = 0
        logger.info("Replica %s is running", record.replica_id)
        self.publisher.publish(record.deployment_id)
        self.changed()

    def _count_failure(self, record: ReplicaRecord, failure: Failure) -> None:
        goal = self.goal(record.deployment_id)
        if goal is None or goal.version != record.code_version:
            return
        goal.failures += 1
        goal.last_error = failure
        if not goal.ever_running and goal.failures >= goal.failure_limit():
            goal.failed = True
            logger.error(
                "Deployment %s failed %d time(s); giving up: %s",
                record.deployment_id,
                goal.failures,
                failure.message,
            )

    def _fail_start(self, record: ReplicaRecord, failure: Failure) -> None:
        self._count_failure(record, failure)
        self.begin_stop(record, timeout_s=0.0)

    def begin_stop(self, record: ReplicaRecord, timeout_s: float | None = None) -> None:
        if record.phase is Phase.STOPPING:
            return
        was_routable = record.phase.routable
        record.phase = Phase.STOPPING
        if was_routable:
            self.publisher.publish(record.deployment_id)
        if timeout_s is None:
            timeout_s = self._graceful_timeout_s(record.deployment_id)
        self.spawn(self._stop(record, timeout_s), f"controller:stop:{record.replica_id}")
        self.changed()

    async def _stop(self, record: ReplicaRecord, timeout_s: float) -> None:
        replica_id = record.replica_id
        if record.address:
            try:
                abandoned = await self.client_for(record).stop(timeout_s)
                if abandoned:
                    logger.warning(
                        "Replica %s stopped with %d request(s) unfinished", replica_id, abandoned
                    )
            except ReplicaUnreachable:
                pass
        process = self._processes.get(replica_id)
        if process is not None:
            try:
                async with asyncio.timeout(EXIT_MARGIN_S if record.address else 0.5):
                    await process.wait()
            except TimeoutError:
                process.kill()
        elif record.pid:
            await self._wait_pid_exit(record.pid, EXIT_MARGIN_S)
            self._forget(replica_id)
            self.changed()

    async def _wait_pid_exit(self, pid: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.05)
        kill_pid(pid)

    def _kill(self, record: ReplicaRecord) -> None:
        process = self._processes.get(record.replica_id)
        if process is not None:
            process.kill()
        elif record.pid:
            kill_pid(record.pid)

    def _begin_reconfigure(self, record: ReplicaRecord) -> None:
        record.phase = Phase.RECONFIGURING
        self.spawn(self._reconfigure(record), f"controller:reconfigure:{record.replica_id}")
        self.changed()

    async def _reconfigure(self, record: ReplicaRecord) -> None:
        goal = self.goal(record.deployment_id)
        if goal is None:
            return
        wanted_user_config = goal.user_config_json
        changed = record.user_config_json != wanted_user_config
        try:
            failure = await self.client_for(record).reconfigure(
                goal.spec.config, user_config_changed=changed
            )
        except ReplicaUnreachable as exc:
            failure = Failure(str(exc))
        if (
            self.replicas.get(record.replica_id) is not record
            or record.phase is not Phase.RECONFIGURING
        ):
            return
        if failure is not None:
            logger.warning(
                "Replica %s failed to reconfigure: %s", record.replica_id, failure.message
            )
            goal.last_error = failure
            self.begin_stop(record)
            return
        record.phase = Phase.RUNNING
        record.user_config_json = wanted_user_config
        record.max_ongoing_requests = goal.max_ongoing_requests
        self.publisher.publish(record.deployment_id)
        self.changed()

    def report_models(self, replica_id: str, model_ids: frozenset[str]) -> None:
        """A replica's multiplexed models changed: routers learn it with the next set."""
        record = self.replicas.get(replica_id)
        if record is not None and record.model_ids != model_ids:
            record.model_ids = model_ids
            if record.phase.routable:
                self.publisher.publish(record.deployment_id)

    def replica_needs_update(self, record: ReplicaRecord) -> bool:
        goal = self.goal(record.deployment_id)
        return goal is not None and needs_reconfigure(goal, record)
