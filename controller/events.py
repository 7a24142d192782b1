"""What the controller's state machine takes in (events) and gives out (actions).

Plain frozen dataclasses: no asyncio, no I/O. The supervisor turns what happens in the world
(a process started or exited, an RPC answered, a replica linked, a timer fired) into events,
feeds them to ``ControllerMachine.handle`` and performs the actions it gets back.
"""

from __future__ import annotations

import dataclasses
import enum

from controller.resources import GangSpec, ResourceRequest
from controller.state import AppGoal
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec, Failure
from serve.config import AutoscalingPolicy
from serve.metrics import Sample

# Events.


@dataclasses.dataclass(frozen=True)
class Tick:
    """Time passed: recovery deadline, late links, health checks due, autoscaling."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """The controller (re)started: the goal state on disk and the replicas it last ran."""

    apps: tuple[AppGoal, ...]
    replicas: tuple[PreviousReplica, ...]


@dataclasses.dataclass(frozen=True)
class PreviousReplica:
    replica_id: str
    pid: int
    code_version: str
    alive: bool


@dataclasses.dataclass(frozen=True)
class AppDeployed:
    """A deploy: an application's new goal (``ValueError`` if it is invalid)."""

    app_name: str
    route_prefix: str | None
    ingress: str
    specs: tuple[DeploymentSpec, ...]
    code_env: CodeEnv
    deployed_at_s: float  # wall clock, for display only
    config_json: str = ""  # the config file's section for this application (serve deploy)
    autoscaling_policy: AutoscalingPolicy | None = None  # application-level policy


@dataclasses.dataclass(frozen=True)
class AppDeleteRequested:
    app_name: str


@dataclasses.dataclass(frozen=True)
class ReplicaLaunched:
    replica_id: str
    pid: int


@dataclasses.dataclass(frozen=True)
class ReplicaPending:
    """The launcher cannot place the replica yet, and says why (``serve status`` shows it)."""

    replica_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class LaunchFailed:
    replica_id: str
    message: str


@dataclasses.dataclass(frozen=True)
class ReplicaExited:
    """A replica process is gone (exit code, or None when it was not our child)."""

    replica_id: str
    code: int | None
    reason: str = ""  # what the launcher saw: "exited with code 1", "Slurm job 7 NODE_FAIL"
    node: str = ""  # where it ran, when the launcher knows (before it linked, say)


@dataclasses.dataclass(frozen=True)
class ReplicaLinked:
    replica_id: str
    address: str
    pid: int
    host: str
    initialized: bool
    code_version: str
    user_config_json: bytes
    draining: bool = False
    gang_id: str = ""
    gang_rank: int = -1
    gang_members: tuple[str, ...] = ()
    ingress_http_address: str = ""  # direct ingress: where it serves HTTP itself
    ingress_grpc_address: str = ""  # and gRPC


@dataclasses.dataclass(frozen=True)
class LinkEnded:
    """A replica's link stream closed (its process may be gone)."""

    replica_id: str


class Call(enum.Enum):
    """The replica RPCs whose outcome moves a replica to its next phase."""

    INITIALIZE = "initialize"  # Initialize, then a first CheckHealth
    RECONFIGURE = "reconfigure"
    CHECK_HEALTH = "check_health"


@dataclasses.dataclass(frozen=True)
class CallDone:
    """A replica RPC finished: ``failure`` is None on success."""

    replica_id: str
    call: Call
    failure: Failure | None


@dataclasses.dataclass(frozen=True)
class LoadReported:
    deployment_id: DeploymentID
    source_id: str
    ongoing: float
    is_handle: bool
    requests_total: int = 0
    errors_total: int = 0
    latency_buckets: tuple[int, ...] = ()
    latency_sum_ms: float = 0.0
    user_metrics: tuple[Sample, ...] = ()  # serve.metrics recorded by the replica's code
    autoscaling_stats: tuple[tuple[str, float], ...] = ()  # record_autoscaling_stats()


@dataclasses.dataclass(frozen=True)
class RoutingStatsReported:
    """What a replica's record_routing_stats() returned (JSON), for its routers."""

    replica_id: str
    stats_json: bytes


@dataclasses.dataclass(frozen=True)
class ModelsReported:
    replica_id: str
    model_ids: frozenset[str]


@dataclasses.dataclass(frozen=True)
class ShutdownRequested:
    """Stop every replica (the controller is going away with them)."""


Event = (
    Tick
    | Restored
    | AppDeployed
    | AppDeleteRequested
    | ReplicaLaunched
    | ReplicaPending
    | LaunchFailed
    | ReplicaExited
    | ReplicaLinked
    | LinkEnded
    | CallDone
    | LoadReported
    | ModelsReported
    | RoutingStatsReported
    | ShutdownRequested
)

# Actions.


@dataclasses.dataclass(frozen=True)
class Launch:
    replica_id: str
    request: ResourceRequest = dataclasses.field(default_factory=ResourceRequest)


@dataclasses.dataclass(frozen=True)
class LaunchGang:
    """Launch a whole gang at once: all its members start together, or none does."""

    gang: GangSpec
    request: ResourceRequest


@dataclasses.dataclass(frozen=True)
class Initialize:
    replica_id: str
    address: str
    app_name: str
    spec: DeploymentSpec
    code_env: CodeEnv
    health_check_timeout_s: float
    rank: int = -1
    world_size: int = 0


@dataclasses.dataclass(frozen=True)
class Reconfigure:
    replica_id: str
    address: str
    config: DeploymentConfig
    user_config_changed: bool


@dataclasses.dataclass(frozen=True)
class CheckHealth:
    replica_id: str
    address: str
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class Stop:
    """Drain and stop gracefully (Stop RPC if linked), then make sure the process exits."""

    replica_id: str
    address: str
    pid: int
    timeout_s: float


@dataclasses.dataclass(frozen=True)
class Kill:
    """SIGKILL the replica's process now."""

    replica_id: str
    pid: int


@dataclasses.dataclass(frozen=True)
class Forget:
    """The replica is gone from the state: drop its record on disk, its link and its client."""

    replica_id: str


@dataclasses.dataclass(frozen=True)
class SaveReplica:
    """Make the replica durable: written before it is launched (so it is on disk before it can
    be counted as running), and again with its pid."""

    replica_id: str
    pid: int
    code_version: str
    request: ResourceRequest


@dataclasses.dataclass(frozen=True)
class PersistApp:
    app: AppGoal


@dataclasses.dataclass(frozen=True)
class MarkDeleting:
    app_name: str


@dataclasses.dataclass(frozen=True)
class DeleteApp:
    app_name: str


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    STOP = "stop"


@dataclasses.dataclass(frozen=True)
class LinkVerdict:
    """The answer to a ``ReplicaLinked`` event."""

    replica_id: str
    verdict: Verdict


Action = (
    Launch
    | LaunchGang
    | Initialize
    | Reconfigure
    | CheckHealth
    | Stop
    | Kill
    | Forget
    | SaveReplica
    | PersistApp
    | MarkDeleting
    | DeleteApp
    | LinkVerdict
)
