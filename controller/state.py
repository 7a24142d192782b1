"""The controller's pure core: goal state, replica records, and the plan between them.

``plan()`` compares what should run (one ``DeploymentGoal`` per deployment) with what runs (one
``ReplicaRecord`` per replica) and returns the steps between them; ``deployment_status()`` and
``application_status()`` say how far along that is. No I/O and no asyncio here.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence

from controller.resources import ResourceRequest
from serve._models import (
    ApplicationStatus,
    CodeEnv,
    DeploymentID,
    DeploymentSpec,
    DeploymentStatus,
    DeploymentStatusTrigger,
    Failure,
    ReplicaState,
)
from serve.config import AutoscalingPolicy


class Phase(enum.Enum):
    """Where a replica is in its life, as the controller tracks it."""

    STARTING = "STARTING"  # process launched, not linked yet
    RECOVERING = "RECOVERING"  # ran under the previous controller; waiting for it to re-link
    INITIALIZING = "INITIALIZING"  # linked; constructor running
    RUNNING = "RUNNING"  # routable
    RECONFIGURING = "RECONFIGURING"  # routable; applying a config change
    STOPPING = "STOPPING"  # draining; not routable

    @property
    def routable(self) -> bool:
        return self in (Phase.RUNNING, Phase.RECONFIGURING)

    @property
    def replica_state(self) -> ReplicaState:
        return {
            Phase.STARTING: ReplicaState.STARTING,
            Phase.RECOVERING: ReplicaState.RECOVERING,
            Phase.INITIALIZING: ReplicaState.STARTING,
            Phase.RUNNING: ReplicaState.RUNNING,
            Phase.RECONFIGURING: ReplicaState.UPDATING,
            Phase.STOPPING: ReplicaState.STOPPING,
        }[self]


@dataclasses.dataclass(frozen=True)
class ScalingRecord:
    """One change of an autoscaled deployment's target (``serve status`` shows the latest)."""

    at_s: float  # wall clock
    prev_num_replicas: int
    curr_num_replicas: int
    policy: str
    reason: str


@dataclasses.dataclass
class DeploymentGoal:
    """What should run for one deployment."""

    deployment_id: DeploymentID
    spec: DeploymentSpec
    target_replicas: int
    failures: int = 0  # constructor failures of this code version
    ever_running: bool = False  # a replica of this code version reached RUNNING
    failed: bool = False
    last_error: Failure | None = None
    unhealthy_reason: str = ""
    scaling: int = 0  # +1 / -1 while the autoscaler moves the target up / down
    last_scale_up_s: float | None = None  # wall clock of the last autoscaling change up
    last_scale_down_s: float | None = None
    scaling_decisions: tuple[ScalingRecord, ...] = ()  # the latest first
    # Past failure_limit() (once a replica of this version ran): no start before retry_at_s,
    # each failure doubling backoff_s (Ray's schedule: 1, 2, 4, ... 64 s).
    backoff_s: float = 0.0
    retry_at_s: float = 0.0  # monotonic
    # Start failures per node in a row, and the nodes to keep replicas off until when.
    node_failures: dict[str, int] = dataclasses.field(default_factory=dict)
    avoid_until_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.spec.code_version

    @property
    def user_config_json(self) -> bytes | None:
        return self.spec.config.user_config_json()

    @property
    def gang_size(self) -> int:
        """Replicas per gang (gang_scheduling_config), or 0 without gangs."""
        gang = self.spec.config.gang_scheduling_config
        return int(gang["gang_size"]) if gang else 0

    def whole_gangs(self, replicas: int) -> int:
        """``replicas`` rounded up to whole gangs, at least one (as Ray's gang autoscaling: the
        same count always gives the same result, so the target never oscillates between the
        gangs either side of it); unchanged without gangs."""
        size = self.gang_size
        if not size:
            return replicas
        return max(-(-replicas // size), 1) * size

    @property
    def max_ongoing_requests(self) -> int:
        return self.spec.config.max_ongoing_requests

    def failure_limit(self) -> int:
        """Constructor failures allowed before the deploy fails (Ray's formula)."""
        limit = self.spec.config.max_constructor_retry_count
        return max(1, min(max(self.target_replicas, 1) * 3, limit))

    @property
    def backing_off(self) -> bool:
        """Starts keep failing past the limit, though this version ran: Ray's UNHEALTHY."""
        return not self.failed and self.ever_running and self.failures >= self.failure_limit()

    def avoided_nodes(self, now_s: float) -> tuple[str, ...]:
        """Nodes where this deployment's replicas failed to start repeatedly, for a while."""
        return tuple(sorted(n for n, until_s in self.avoid_until_s.items() if until_s > now_s))


@dataclasses.dataclass
class AppGoal:
    """One application: its deployments and how it was deployed."""

    name: str
    ingress: str
    route_prefix: str | None
    code_env: CodeEnv
    deployments: dict[str, DeploymentGoal]
    deployed_at_s: float  # wall clock, for display only
    deleting: bool = False
    config_json: str = ""  # as deployed from a config file (`serve config` prints it)
    autoscaling_policy: AutoscalingPolicy | None = None  # decides for all its deployments


@dataclasses.dataclass
class ReplicaRecord:
    """One replica process as the controller knows it."""

    replica_id: str
    deployment_id: DeploymentID
    code_version: str
    phase: Phase
    started_at_s: float  # monotonic
    pid: int = 0
    address: str = ""
    host: str = ""
    user_config_json: bytes | None = None  # as last applied in the replica
    max_ongoing_requests: int = 0  # as last applied in the replica
    model_ids: frozenset[str] = frozenset()
    health_failures: int = 0
    next_health_check_s: float = 0.0  # monotonic
    rank: int = -1  # 0..n-1 among its deployment's replicas (get_replica_context().rank)
    pending: str = ""  # while the launcher cannot place it: why
    routing_stats_json: bytes = b""  # its record_routing_stats(), published to routers
    request: ResourceRequest = dataclasses.field(default_factory=ResourceRequest)
    gang_id: str = ""  # a gang member: its gang, its rank in it, and all members by rank
    gang_rank: int = -1
    gang_members: tuple[str, ...] = ()
    ingress_http_address: str = ""  # direct ingress: where it serves HTTP itself
    ingress_grpc_address: str = ""  # and gRPC


@dataclasses.dataclass(frozen=True)
class StartReplicas:
    deployment_id: DeploymentID
    count: int


@dataclasses.dataclass(frozen=True)
class StopReplica:
    replica_id: str


@dataclasses.dataclass(frozen=True)
class ReconfigureReplica:
    replica_id: str


# What plan() asks for; the state machine turns each step into actions (controller.events).
PlanStep = StartReplicas | StopReplica | ReconfigureReplica


def needs_reconfigure(goal: DeploymentGoal, record: ReplicaRecord) -> bool:
    return (
        record.user_config_json != goal.user_config_json
        or record.max_ongoing_requests != goal.max_ongoing_requests
    )


def _stop_order(record: ReplicaRecord) -> tuple[int, float]:
    """Stop replicas that serve nothing yet first, then the newest."""
    return (1 if record.phase.routable else 0, -record.started_at_s)


def _units(records: Iterable[ReplicaRecord]) -> list[list[ReplicaRecord]]:
    """What stops together, in stop order: one replica, or a whole gang."""
    units: dict[str, list[ReplicaRecord]] = {}
    for record in records:
        units.setdefault(record.gang_id or record.replica_id, []).append(record)
    return sorted(units.values(), key=lambda unit: max(_stop_order(r) for r in unit))


def plan(
    goals: Mapping[DeploymentID, DeploymentGoal], replicas: Iterable[ReplicaRecord]
) -> list[PlanStep]:
    """The steps that move the replicas towards the goals.

    Replicas of an old code version are replaced in waves of at most
    ``max(int(rolling_update_percentage * target), 1)``, as in Ray: with ``max_surge_percent``
    0 (the default) old replicas stop first and no more than the target ever run or start;
    with a surge, replacements start first (up to ``ceil(target * max_surge_percent / 100)``
    above the target) and old replicas stop only while the running ones cover the target. A
    deployment whose constructor keeps failing starts nothing more.

    Gangs start, stop and are replaced whole: a gang deployment's waves and surge are whole
    gangs (at least one), and it starts whole gangs only.
    """
    active: dict[DeploymentID, list[ReplicaRecord]] = {}
    stopping: dict[DeploymentID, int] = {}
    steps: list[PlanStep] = []
    for record in replicas:
        if record.deployment_id not in goals:
            if record.phase is not Phase.STOPPING:
                steps.append(StopReplica(record.replica_id))
        elif record.phase is Phase.STOPPING:
            if record.code_version != goals[record.deployment_id].version:
                stopping[record.deployment_id] = stopping.get(record.deployment_id, 0) + 1
        else:
            active.setdefault(record.deployment_id, []).append(record)
    for deployment_id, goal in goals.items():
        steps.extend(
            _plan_deployment(goal, active.get(deployment_id, []), stopping.get(deployment_id, 0))
        )
    return steps


def rollout_size(goal: DeploymentGoal) -> int:
    """How many old replicas a rollout replaces at once (Ray's formula), in whole gangs."""
    fraction = goal.spec.config.rolling_update_percentage
    return _whole_gangs(goal, max(int(fraction * goal.target_replicas), 1))


def surge_allowance(goal: DeploymentGoal) -> int:
    """How many replicas a rollout may run above the target (0: it stops old ones first)."""
    surge = math.ceil(goal.target_replicas * goal.spec.config.max_surge_percent / 100)
    return _whole_gangs(goal, surge)


def _whole_gangs(goal: DeploymentGoal, replicas: int) -> int:
    """``replicas`` rounded up to whole gangs (unchanged without gangs)."""
    size = max(goal.gang_size, 1)
    return -(-replicas // size) * size


def _take(units: Iterable[list[ReplicaRecord]], limit: int, most: int) -> list[ReplicaRecord]:
    """The first units, in order and whole, that fit in ``limit`` replicas.

    A unit larger than ``most`` (the largest ``limit`` can get) could never fit: an old gang
    bigger than a wave, its gang size changed since. It goes alone once ``limit`` reaches
    ``most``, so a rollout never stalls on it.
    """
    taken: list[ReplicaRecord] = []
    for unit in units:
        if len(taken) + len(unit) > limit:
            if not taken and 0 < most <= limit:
                taken.extend(unit)
            break
        taken.extend(unit)
    return taken


def _plan_deployment(
    goal: DeploymentGoal, active: list[ReplicaRecord], old_stopping: int
) -> list[PlanStep]:
    target = goal.target_replicas
    gang = max(goal.gang_size, 1)
    new = [r for r in active if r.code_version == goal.version]
    old = sorted((r for r in active if r.code_version != goal.version), key=_stop_order)
    # Replicas of the last controller that have not re-linked are neither counted nor stopped
    # by a wave: what they do is unknown until they link (or are given up).
    known_old = [r for r in old if r.phase is not Phase.RECOVERING]
    to_stop: list[ReplicaRecord] = []
    surge = surge_allowance(goal)
    wave = rollout_size(goal)
    if known_old and target > 0 and not goal.failed:  # a failed version replaces nothing
        new_running = sum(1 for r in new if r.phase.routable)
        units = _units(known_old)
        if surge:
            # Start first; stop old ones (a wave at a time) only while the target stays covered.
            idle: list[list[ReplicaRecord]] = []
            serving: list[list[ReplicaRecord]] = []
            for unit in units:
                (serving if any(r.phase.routable for r in unit) else idle).append(unit)
            routable = sum(1 for r in known_old if r.phase.routable)
            # Room too small for a whole gang is never filled: nothing waits for it.
            unfillable = max(target + surge - len(new) - len(old), 0) % gang
            spare = max(new_running + routable - target, 0) + unfillable
            to_stop = _take(idle, wave, most=wave)
            to_stop += _take(serving, min(spare, wave - len(to_stop)), most=min(surge, wave))
        elif target >= len(old) + old_stopping:  # a scale-down finishes first, as in Ray
            unfillable = max(target - len(new) - len(old), 0) % gang  # as above
            pending = target - new_running - len(known_old) - unfillable
            to_stop = _take(units, wave - pending, most=wave)
    steps: list[PlanStep] = [StopReplica(r.replica_id) for r in to_stop]
    kept_old = [r for r in old if r not in to_stop]
    live = len(new) + len(kept_old)
    rolling = bool(surge and kept_old)  # old ones stop as the new ones run, not now
    count = min(target - len(new), target + surge - live) if rolling else target - live
    count = count // gang * gang
    if count > 0 and not goal.failed:
        steps.append(StartReplicas(goal.deployment_id, count))
    # Too many: old ones go first (an old gang at least), then those not serving yet, then
    # the newest; whole gangs only.
    excess = len(new) - target if rolling else live - target
    extra = [] if rolling else _take(_units(kept_old), excess, most=1)
    extra += _take(_units(new), excess - len(extra), most=0)
    steps.extend(StopReplica(r.replica_id) for r in extra)
    for record in new:
        if record.phase is Phase.RUNNING and needs_reconfigure(goal, record):
            steps.append(ReconfigureReplica(record.replica_id))
    return steps


@dataclasses.dataclass(frozen=True)
class DeploymentView:
    """A deployment's status as ``serve.status()`` shows it."""

    status: DeploymentStatus
    trigger: DeploymentStatusTrigger
    message: str
    replica_states: dict[str, int]


def deployment_status(goal: DeploymentGoal, replicas: Sequence[ReplicaRecord]) -> DeploymentView:
    states: dict[str, int] = {}
    for record in replicas:
        key = record.phase.replica_state.value
        states[key] = states.get(key, 0) + 1
    if goal.failed:
        detail = goal.last_error.message if goal.last_error else "its replicas failed to start"
        if goal.last_error is not None and goal.last_error.health_check:  # as Ray: UNHEALTHY
            return DeploymentView(
                DeploymentStatus.UNHEALTHY,
                DeploymentStatusTrigger.HEALTH_CHECK_FAILED,
                f"Deployment '{goal.deployment_id.name}' failed its health check on start "
                f"{goal.failures} time(s) (limit {goal.failure_limit()}): {detail}",
                states,
            )
        return DeploymentView(
            DeploymentStatus.DEPLOY_FAILED,
            DeploymentStatusTrigger.REPLICA_STARTUP_FAILED,
            f"Deployment '{goal.deployment_id.name}' failed to start {goal.failures} time(s) "
            f"(limit {goal.failure_limit()}): {detail}",
            states,
        )
    current = [
        r for r in replicas if r.code_version == goal.version and r.phase is not Phase.STOPPING
    ]
    ready = [r for r in current if r.phase is Phase.RUNNING and not needs_reconfigure(goal, r)]
    if goal.backing_off:
        detail = goal.last_error.message if goal.last_error else ""
        return DeploymentView(  # Ray's words
            DeploymentStatus.UNHEALTHY,
            DeploymentStatusTrigger.REPLICA_STARTUP_FAILED,
            f"The deployment failed to start {goal.failures} times in a row. This may be due "
            "to a problem with its constructor or initial health check failing. See controller "
            f"logs for details. Retrying after {goal.backoff_s:g} seconds. Error:\n{detail}",
            states,
        )
    if goal.unhealthy_reason:
        return DeploymentView(
            DeploymentStatus.UNHEALTHY,
            DeploymentStatusTrigger.HEALTH_CHECK_FAILED,
            goal.unhealthy_reason,
            states,
        )
    # As Ray, an update is complete once the replicas of older versions have stopped too (their
    # in-flight requests finished, their __del__ ran): serve.run returns after that.
    old = sum(1 for r in replicas if r.code_version != goal.version)
    if len(ready) == goal.target_replicas == len(current) and not old:
        trigger = DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
        if goal.scaling:
            trigger = (
                DeploymentStatusTrigger.UPSCALE_COMPLETED
                if goal.scaling > 0
                else DeploymentStatusTrigger.DOWNSCALE_COMPLETED
            )
        return DeploymentView(DeploymentStatus.HEALTHY, trigger, "", states)
    if goal.scaling and goal.ever_running:
        status = DeploymentStatus.UPSCALING if goal.scaling > 0 else DeploymentStatus.DOWNSCALING
        return DeploymentView(
            status,
            DeploymentStatusTrigger.AUTOSCALING,
            f"{len(ready)} replicas running, autoscaling to {goal.target_replicas}",
            states,
        )
    message = f"{len(ready)}/{goal.target_replicas} replicas ready"
    if old:
        message += f"; {old} replica(s) of the previous version stopping"
    pending = sorted({r.pending for r in current if r.pending})
    if pending:
        count = sum(1 for r in current if r.pending)
        message += f"; {count} replica(s) pending: {'; '.join(pending)}"
    if goal.last_error is not None and goal.failures:
        message += f"; {goal.failures} constructor failure(s), last: {goal.last_error.message}"
    return DeploymentView(
        DeploymentStatus.UPDATING, DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, message, states
    )


def application_status(
    app: AppGoal, views: Mapping[str, DeploymentView]
) -> tuple[ApplicationStatus, str]:
    if app.deleting:
        return ApplicationStatus.DELETING, "Deleting."
    failed = [name for name, v in views.items() if v.status is DeploymentStatus.DEPLOY_FAILED]
    if failed:
        return ApplicationStatus.DEPLOY_FAILED, "\n".join(views[n].message for n in failed)
    unhealthy = [name for name, v in views.items() if v.status is DeploymentStatus.UNHEALTHY]
    if unhealthy:
        return ApplicationStatus.UNHEALTHY, "\n".join(views[n].message for n in unhealthy)
    running = (DeploymentStatus.HEALTHY, DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING)
    if all(v.status in running for v in views.values()):
        return ApplicationStatus.RUNNING, ""
    waiting = [
        f"{n}: {v.message}" for n, v in views.items() if v.status is not DeploymentStatus.HEALTHY
    ]
    return ApplicationStatus.DEPLOYING, "; ".join(waiting)
