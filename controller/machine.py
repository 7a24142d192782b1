"""The controller as a pure state machine: events in, actions out.

``handle(event, now_s)`` updates goals and replica records and returns what must be done
(launch, RPCs, stop, store writes); the supervisor does it and reports back with events. No
asyncio, no I/O, time passed in: every decision is unit-tested without processes.

A replica's life: STARTING (launched) -> INITIALIZING (linked) -> RUNNING <-> RECONFIGURING ->
STOPPING -> gone; after a controller restart, replicas of the last one are RECOVERING until they
re-link (re-adopted as they are) or RECOVERY_WAIT_S passes (killed).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from controller import events as ev, views
from controller.goals import (
    build_app,
    count_failure,
    count_start,
    free_rank,
    new_gang_id,
    new_replica_id,
    whole_gangs,
)
from controller.health import Health, HealthDecider, HealthPolicy
from controller.load import Autoscaler, LoadBook, autoscale_all, look_back_s
from controller.resources import GangSpec, ResourceRequest
from controller.state import (
    AppGoal,
    DeploymentGoal,
    DeploymentView,
    Phase,
    ReconfigureReplica,
    ReplicaRecord,
    StartReplicas,
    StopReplica,
    plan,
)
from serve._models import ApplicationStatus, DeploymentID, Failure, ReplicaID

logger = logging.getLogger(__name__)

RECOVERY_WAIT_S = 5.0  # after a restart, how long the last controller's replicas may take to link
LINK_TIMEOUT_S = 60.0  # a launched replica that has not linked by then is replaced
DEFAULT_GRACEFUL_S = 20.0
KILL = -1.0  # a stop timeout meaning: no graceful stop, SIGKILL now
SETTLED = (ApplicationStatus.RUNNING, ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)

# The phases in which the outcome of each call still matters (otherwise it is stale).
_EXPECTED = {
    ev.Call.INITIALIZE: (Phase.INITIALIZING,),
    ev.Call.RECONFIGURE: (Phase.RECONFIGURING,),
    ev.Call.CHECK_HEALTH: (Phase.RUNNING, Phase.RECONFIGURING),
}


class ControllerMachine:
    """Goal state and replica records; every change goes through ``handle``."""

    def __init__(
        self,
        *,
        health: HealthPolicy | None = None,
        autoscaler: Autoscaler | None = None,
        new_replica_id: Callable[[DeploymentID], str] = new_replica_id,
    ) -> None:
        self.apps: dict[str, AppGoal] = {}
        self.replicas: dict[str, ReplicaRecord] = {}
        self.replica_starts: dict[DeploymentID, int] = {}
        self.recovered = True  # False while replicas of the last controller may still re-link
        self.load = autoscaler if autoscaler is not None else LoadBook()
        self._health = health if health is not None else HealthDecider()
        self._new_replica_id = new_replica_id
        self._launched: set[str] = set()  # replicas whose process this controller started
        self._ended: set[str] = set()  # launched here and reported gone: never re-adopted
        self._applying: dict[str, tuple[bytes | None, int]] = {}  # reconfigure in flight

    # Reading the state.

    def goals(self) -> dict[DeploymentID, DeploymentGoal]:
        return {
            goal.deployment_id: goal
            for app in self.apps.values()
            if not app.deleting
            for goal in app.deployments.values()
        }

    def goal(self, deployment_id: DeploymentID) -> DeploymentGoal | None:
        app = self.apps.get(deployment_id.app_name)
        return None if app is None or app.deleting else app.deployments.get(deployment_id.name)

    def deployment_views(self, app: AppGoal) -> dict[str, DeploymentView]:
        return views.deployment_views(app, self.replicas.values())

    def app_status(self, app: AppGoal) -> tuple[ApplicationStatus, str]:
        return views.app_status(app, self.replicas.values())

    # Events.

    def handle(self, event: ev.Event, now_s: float) -> list[ev.Action]:
        """Apply one event; the actions it calls for, in the order to perform them."""
        out: list[ev.Action] = []
        match event:
            case ev.Tick():
                self._tick(now_s, out)
            case ev.Restored():
                self._restore(event, now_s, out)
            case ev.AppDeployed():
                self._deploy(event, out)
            case ev.AppDeleteRequested():
                self._delete(event.app_name, out)
            case ev.ShutdownRequested():
                for app in self.apps.values():
                    app.deleting = True
            case ev.ReplicaLaunched():
                self._launched_ok(event, now_s, out)
            case ev.ReplicaPending():
                record = self.replicas.get(event.replica_id)
                if record is not None and record.phase is Phase.STARTING:
                    if record.pending != event.reason:
                        logger.info("Replica %s pending: %s", event.replica_id, event.reason)
                    record.pending = event.reason
            case ev.LaunchFailed():
                self._launch_failed(event, now_s, out)
            case ev.ReplicaExited():
                self._exited(event, now_s, out)
            case ev.ReplicaLinked():
                self._link(event, now_s, out)
            case ev.LinkEnded():
                self._unlink(event, out)
            case ev.CallDone():
                self._call_done(event, now_s, out)
            case ev.LoadReported():
                self._report_load(event, now_s)
            case ev.ModelsReported():
                record = self.replicas.get(event.replica_id)
                if record is not None:
                    record.model_ids = event.model_ids
            case ev.RoutingStatsReported():
                record = self.replicas.get(event.replica_id)
                if record is not None:
                    record.routing_stats_json = event.stats_json
        self._converge(now_s, out)
        return out

    # Goals.

    def _deploy(self, event: ev.AppDeployed, out: list[ev.Action]) -> None:
        app = build_app(event, self.apps.get(event.app_name))
        self.apps[app.name] = app
        out.append(ev.PersistApp(app))
        logger.info("Deploying application %r: %s", app.name, sorted(app.deployments))

    def _delete(self, app_name: str, out: list[ev.Action]) -> None:
        app = self.apps.get(app_name)
        if app is None or app.deleting:
            return
        app.deleting = True
        out.append(ev.MarkDeleting(app_name))
        logger.info("Deleting application %r", app_name)

    # Recovery after a restart.

    def _restore(self, event: ev.Restored, now_s: float, out: list[ev.Action]) -> None:
        """Replicas the last controller ran, still alive, are expected to re-link (re-adopted).

        Until they do (or RECOVERY_WAIT_S passes) they count towards their deployment's target
        (no duplicates start) and nothing is published (routers keep the sets they knew).
        """
        for app in event.apps:
            self.apps[app.name] = app
        if self.apps:
            logger.info("Recovered %d application(s) from the state directory", len(self.apps))
        for previous in event.replicas:
            try:
                deployment_id = ReplicaID.parse(previous.replica_id).deployment_id
            except ValueError:
                deployment_id = None
            if deployment_id is None or not previous.alive:
                out.append(ev.Forget(previous.replica_id))
                continue
            self.replicas[previous.replica_id] = ReplicaRecord(
                replica_id=previous.replica_id,
                deployment_id=deployment_id,
                code_version=previous.code_version,
                phase=Phase.RECOVERING,
                started_at_s=now_s,
                pid=previous.pid,
            )
        if self.replicas:
            self.recovered = False
            logger.info("Waiting for %d replica(s) to re-link", len(self.replicas))

    def _check_recovery(self, now_s: float, out: list[ev.Action]) -> None:
        if self.recovered:
            return
        recovering = [r for r in self.replicas.values() if r.phase is Phase.RECOVERING]
        if recovering and now_s - recovering[0].started_at_s < RECOVERY_WAIT_S:
            return
        for record in recovering:
            logger.warning("Replica %s did not re-link; stopping it", record.replica_id)
            out.append(ev.Kill(record.replica_id, record.pid))
            self._forget(record.replica_id, out)
        self.recovered = True

    # Reconciliation.

    def _tick(self, now_s: float, out: list[ev.Action]) -> None:
        self._check_recovery(now_s, out)
        look_back = {d: look_back_s(g) for d, g in self.goals().items()}
        self.load.prune(look_back, self.replicas.keys(), now_s)
        for late in list(self.replicas.values()):
            if (
                late.phase is Phase.STARTING
                and late.replica_id in self._launched  # pending replicas wait, as in Ray
                and now_s - late.started_at_s > LINK_TIMEOUT_S
            ):
                self._fail_start(
                    late,
                    Failure(f"replica did not start within {LINK_TIMEOUT_S:.0f}s"),
                    now_s,
                    out,
                )
        for record in self.replicas.values():
            goal = self.goal(record.deployment_id)
            if goal is None or not self._health.due(record, now_s):
                continue
            config = goal.spec.config
            self._health.scheduled(record, config.health_check_period_s, now_s)
            out.append(
                ev.CheckHealth(record.replica_id, record.address, config.health_check_timeout_s)
            )

    def _converge(self, now_s: float, out: list[ev.Action]) -> None:
        """Autoscale, keep gangs whole, move replicas towards the goals, finish deletions."""
        goals = self.goals()
        routable: dict[DeploymentID, list[str]] = {}
        for r in self.replicas.values():
            if r.phase.routable:
                routable.setdefault(r.deployment_id, []).append(r.replica_id)
        # Application-level policies decide for all of an application's deployments at once;
        # then a gang deployment's target is rounded to whole gangs, whoever decided it.
        autoscale_all(self.load, self.apps.values(), routable, now_s)
        for goal in goals.values():
            whole_gangs(goal)
        if self.recovered:  # until then, a gang's members may still be re-linking
            self._restart_broken_gangs(out)
        for step in plan(goals, list(self.replicas.values())):
            if isinstance(step, StartReplicas):
                goal = goals[step.deployment_id]
                if now_s < goal.retry_at_s:
                    continue  # backing off after repeated start failures
                if goal.gang_size:
                    for _ in range(step.count // goal.gang_size):
                        self._start_gang(goal, now_s, out)
                    continue
                for _ in range(step.count):
                    self._start(step.deployment_id, now_s, out)
            elif isinstance(step, StopReplica):
                self._begin_stop(self.replicas[step.replica_id], out)
            elif isinstance(step, ReconfigureReplica):
                self._begin_reconfigure(self.replicas[step.replica_id], goals, out)
        for name, app in list(self.apps.items()):
            if app.deleting and not any(
                r.deployment_id.app_name == name for r in self.replicas.values()
            ):
                del self.apps[name]
                out.append(ev.DeleteApp(name))
                logger.info("Application %r deleted", name)

    def _start(self, deployment_id: DeploymentID, now_s: float, out: list[ev.Action]) -> None:
        goal = self.goals()[deployment_id]
        replica_id = self._new_replica_id(deployment_id)
        request = self._request(goal, now_s)
        self._new_record(goal, replica_id, request, now_s, out)
        out.append(ev.Launch(replica_id, request))

    def _start_gang(self, goal: DeploymentGoal, now_s: float, out: list[ev.Action]) -> None:
        """gang_size replicas, saved, then launched as one: they start together or not at all."""
        deployment_id = goal.deployment_id
        gang = goal.spec.config.gang_scheduling_config
        members = tuple(self._new_replica_id(deployment_id) for _ in range(goal.gang_size))
        spec = GangSpec(new_gang_id(), members, str(gang["gang_placement_strategy"]))
        request = dataclasses.replace(
            self._request(goal, now_s),
            gang_id=spec.gang_id,
            gang_size=goal.gang_size,
            gang_strategy=spec.strategy,
        )
        for rank, replica_id in enumerate(members):
            record = self._new_record(goal, replica_id, request, now_s, out)
            record.gang_id, record.gang_rank, record.gang_members = spec.gang_id, rank, members
        out.append(ev.LaunchGang(spec, request))

    @staticmethod
    def _request(goal: DeploymentGoal, now_s: float) -> ResourceRequest:
        return ResourceRequest.from_config(
            goal.spec.config, str(goal.deployment_id), avoid_nodes=goal.avoided_nodes(now_s)
        )

    def _new_record(
        self,
        goal: DeploymentGoal,
        replica_id: str,
        request: ResourceRequest,
        now_s: float,
        out: list[ev.Action],
    ) -> ReplicaRecord:
        """A replica about to be launched: recorded, and made durable first."""
        deployment_id = goal.deployment_id
        record = self.replicas[replica_id] = ReplicaRecord(
            replica_id=replica_id,
            deployment_id=deployment_id,
            code_version=goal.version,
            phase=Phase.STARTING,
            started_at_s=now_s,
            rank=free_rank(self.replicas.values(), deployment_id),
            request=request,
        )
        self.replica_starts[deployment_id] = self.replica_starts.get(deployment_id, 0) + 1
        out.append(ev.SaveReplica(replica_id, 0, goal.version, request))
        return record

    def _restart_broken_gangs(self, out: list[ev.Action]) -> None:
        """RESTART_GANG: a gang that lost a member (it exited, failed, or is being replaced)
        is stopped whole; the plan then starts a new gang in its place."""
        gangs: dict[str, list[ReplicaRecord]] = {}
        for record in self.replicas.values():
            if record.gang_id and record.phase is not Phase.STOPPING:
                gangs.setdefault(record.gang_id, []).append(record)
        for gang_id, members in gangs.items():
            if len(members) < len(members[0].gang_members):
                logger.warning(
                    "Gang %s of %s lost %d of its %d members; restarting it whole",
                    gang_id,
                    members[0].deployment_id,
                    len(members[0].gang_members) - len(members),
                    len(members[0].gang_members),
                )
                for record in members:
                    self._begin_stop(record, out, timeout_s=KILL)

    def _begin_stop(
        self, record: ReplicaRecord, out: list[ev.Action], timeout_s: float | None = None
    ) -> None:
        """Stop gracefully (drain up to ``timeout_s``, the deployment's by default), or KILL."""
        if record.phase is Phase.STOPPING:
            return
        record.phase = Phase.STOPPING
        self._applying.pop(record.replica_id, None)
        if timeout_s is None:
            app = self.apps.get(record.deployment_id.app_name)
            goal = app.deployments.get(record.deployment_id.name) if app is not None else None
            config = goal.spec.config if goal is not None else None
            timeout_s = config.graceful_shutdown_timeout_s if config else DEFAULT_GRACEFUL_S
        if timeout_s < 0:  # no drain: a hung replica would hang its Stop call too
            out.append(ev.Kill(record.replica_id, record.pid))
        else:
            out.append(ev.Stop(record.replica_id, record.address, record.pid, timeout_s))

    def _begin_reconfigure(
        self,
        record: ReplicaRecord,
        goals: dict[DeploymentID, DeploymentGoal],
        out: list[ev.Action],
    ) -> None:
        goal = goals[record.deployment_id]
        record.phase = Phase.RECONFIGURING
        wanted = goal.user_config_json
        self._applying[record.replica_id] = (wanted, goal.max_ongoing_requests)
        out.append(
            ev.Reconfigure(
                record.replica_id,
                record.address,
                goal.spec.config,
                user_config_changed=record.user_config_json != wanted,
            )
        )

    def _report_load(self, event: ev.LoadReported, now_s: float) -> None:
        if self.goal(event.deployment_id) is None:
            return
        if not event.is_handle and event.source_id not in self.replicas:
            return  # a replica this controller no longer runs
        self.load.report(event, look_back_s(self.goal(event.deployment_id)), now_s)

    # Replica processes.

    def _launched_ok(self, event: ev.ReplicaLaunched, now_s: float, out: list[ev.Action]) -> None:
        record = self.replicas.get(event.replica_id)
        self._launched.add(event.replica_id)
        if record is None or record.phase is Phase.STOPPING:
            out.append(ev.Kill(event.replica_id, event.pid))  # stopped while it was launching
            return
        record.pid = event.pid
        record.pending = ""
        record.started_at_s = now_s  # the link timeout counts from here, not from pending
        out.append(
            ev.SaveReplica(record.replica_id, event.pid, record.code_version, record.request)
        )
        logger.info("Started replica %s (pid %d)", record.replica_id, event.pid)  # 0: remote

    def _launch_failed(self, event: ev.LaunchFailed, now_s: float, out: list[ev.Action]) -> None:
        record = self.replicas.get(event.replica_id)
        if record is None:
            return
        self._count_failure(
            record, Failure(f"could not launch the replica process: {event.message}"), now_s
        )
        self._forget(record.replica_id, out)

    def _exited(self, event: ev.ReplicaExited, now_s: float, out: list[ev.Action]) -> None:
        record = self.replicas.get(event.replica_id)
        if event.replica_id in self._launched:
            self._ended.add(event.replica_id)
        if record is not None and record.phase is not Phase.STOPPING:
            what = event.reason or f"exited with code {event.code}"
            logger.warning("Replica %s ended unexpectedly: %s", event.replica_id, what)
            if record.phase in (Phase.STARTING, Phase.INITIALIZING):
                self._count_failure(
                    record,
                    Failure(
                        f"the replica process ended while starting ({what}); see its log for "
                        "the reason"
                    ),
                    now_s,
                    event.node,
                )
        self._forget(event.replica_id, out)

    def _forget(self, replica_id: str, out: list[ev.Action]) -> None:
        self.replicas.pop(replica_id, None)
        self._launched.discard(replica_id)
        self._applying.pop(replica_id, None)
        self._health.forget(replica_id)
        out.append(ev.Forget(replica_id))

    def _count_failure(
        self, record: ReplicaRecord, failure: Failure, now_s: float, node: str = ""
    ) -> None:
        goal = self.goal(record.deployment_id)
        if goal is not None and goal.version == record.code_version:
            count_failure(goal, failure, node or record.host, now_s)

    def _fail_start(
        self, record: ReplicaRecord, failure: Failure, now_s: float, out: list[ev.Action]
    ) -> None:
        self._count_failure(record, failure, now_s)
        self._begin_stop(record, out, timeout_s=0.0)

    # Links.

    def _link(self, event: ev.ReplicaLinked, now_s: float, out: list[ev.Action]) -> None:
        replica_id = event.replica_id
        record = self.replicas.get(replica_id)
        recovering = record is not None and record.phase is Phase.RECOVERING
        if recovering:
            del self.replicas[replica_id]  # re-adopted below, or told to stop
            record = None
        if record is None:
            ended = replica_id in self._ended  # e.g. its node was declared lost, yet it lives
            if not ended and not event.draining and self._adopt(event, recovering, now_s, out):
                out.append(ev.LinkVerdict(replica_id, ev.Verdict.ACCEPTED))
            else:
                if replica_id not in self._launched:
                    out.append(ev.Forget(replica_id))
                out.append(ev.LinkVerdict(replica_id, ev.Verdict.STOP))
            if not any(r.phase is Phase.RECOVERING for r in self.replicas.values()):
                self._check_recovery(now_s, out)  # the last one the restart waited for
            return
        record.address, record.pid, record.host = event.address, event.pid, event.host
        record.ingress_http_address = event.ingress_http_address
        record.ingress_grpc_address = event.ingress_grpc_address
        out.append(ev.LinkVerdict(replica_id, ev.Verdict.ACCEPTED))
        if record.phase is not Phase.STARTING:
            return
        app = self.apps.get(record.deployment_id.app_name)
        goal = self.goal(record.deployment_id)
        if app is None or goal is None or goal.version != record.code_version:
            self._begin_stop(record, out)
            return
        record.phase = Phase.INITIALIZING
        out.append(
            ev.Initialize(
                replica_id,
                record.address,
                app.name,
                goal.spec,
                app.code_env,
                goal.spec.config.health_check_timeout_s,
                record.rank,
                goal.target_replicas,
            )
        )

    def _adopt(
        self, event: ev.ReplicaLinked, recovering: bool, now_s: float, out: list[ev.Action]
    ) -> bool:
        """A replica this controller did not start (it restarted): keep it if still wanted.

        A replica of an older version that the last controller ran is kept too: the rollout it
        was part of goes on (old replicas stop as new ones run), and capacity never drops.
        """
        try:
            deployment_id = ReplicaID.parse(event.replica_id).deployment_id
        except ValueError:
            return False
        goal = self.goal(deployment_id)
        current = goal is not None and goal.version == event.code_version
        if goal is None or not event.initialized or not (current or recovering):
            logger.info(
                "Replica %s is not part of the goal state; telling it to stop", event.replica_id
            )
            return False
        request = ResourceRequest.from_config(goal.spec.config, str(deployment_id))
        self.replicas[event.replica_id] = ReplicaRecord(
            replica_id=event.replica_id,
            deployment_id=deployment_id,
            code_version=event.code_version,
            phase=Phase.RUNNING,
            started_at_s=now_s,
            pid=event.pid,
            address=event.address,
            host=event.host,
            user_config_json=event.user_config_json or None,
            max_ongoing_requests=goal.max_ongoing_requests,
            next_health_check_s=now_s + goal.spec.config.health_check_period_s,
            request=request,
            gang_id=event.gang_id,
            gang_rank=event.gang_rank,
            gang_members=event.gang_members,
            ingress_http_address=event.ingress_http_address,
            ingress_grpc_address=event.ingress_grpc_address,
        )
        out.append(ev.SaveReplica(event.replica_id, event.pid, event.code_version, request))
        goal.ever_running = goal.ever_running or current
        logger.info("Re-adopted replica %s (pid %d)", event.replica_id, event.pid)
        return True

    def _unlink(self, event: ev.LinkEnded, out: list[ev.Action]) -> None:
        """A replica's link ended. For replicas this process did not launch, that is death."""
        record = self.replicas.get(event.replica_id)
        if record is None or event.replica_id in self._launched or not record.pid:
            return
        if record.phase is not Phase.STOPPING:
            logger.warning(
                "Lost the link to re-adopted replica %s; replacing it", record.replica_id
            )
        out.append(ev.Kill(record.replica_id, record.pid))
        self._forget(record.replica_id, out)

    # Replica calls: one path from an RPC's outcome to the replica's next phase.

    def _call_done(self, event: ev.CallDone, now_s: float, out: list[ev.Action]) -> None:
        record = self.replicas.get(event.replica_id)
        if record is None or record.phase not in _EXPECTED[event.call]:
            if event.call is ev.Call.CHECK_HEALTH:
                self._health.forget(event.replica_id)
            return  # stale: the replica moved on (or is gone) while the call ran
        goal = self.goal(record.deployment_id)
        if event.call is ev.Call.CHECK_HEALTH:
            self._health_checked(record, goal, event.failure, out)
            return
        if goal is None:
            self._begin_stop(record, out)
            return
        failure = event.failure
        if event.call is ev.Call.INITIALIZE:
            if failure is not None:
                logger.warning(
                    "Replica %s failed to initialize: %s", record.replica_id, failure.message
                )
                self._fail_start(record, failure, now_s, out)
                return
            record.user_config_json = goal.user_config_json
            record.max_ongoing_requests = goal.max_ongoing_requests
            record.next_health_check_s = now_s + goal.spec.config.health_check_period_s
            if goal.version == record.code_version:
                count_start(goal, record.host)
            logger.info("Replica %s is running", record.replica_id)
        else:
            applied = self._applying.pop(record.replica_id, (None, 0))
            if failure is not None:
                logger.warning(
                    "Replica %s failed to reconfigure: %s", record.replica_id, failure.message
                )
                goal.last_error = failure
                self._begin_stop(record, out)
                return
            record.user_config_json, record.max_ongoing_requests = applied
        record.phase = Phase.RUNNING

    def _health_checked(
        self,
        record: ReplicaRecord,
        goal: DeploymentGoal | None,
        failure: Failure | None,
        out: list[ev.Action],
    ) -> None:
        verdict = self._health.judge(record, failure)
        if goal is None:
            return
        if verdict.health is Health.PASSED:
            goal.unhealthy_reason = ""
            return
        logger.warning(
            "Replica %s failed a health check (%d in a row): %s",
            record.replica_id,
            record.health_failures,
            failure.message if failure is not None else "",
        )
        if verdict.health is Health.REPLACE:  # killed: its admitted requests fail at once
            goal.unhealthy_reason = verdict.reason
            self._begin_stop(record, out, timeout_s=KILL)
