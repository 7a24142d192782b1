"""Internal value types shared by the SDK and both daemons. Frozen; no I/O; no protobuf."""

from __future__ import annotations

import dataclasses
import enum
import secrets
from typing import Any

import orjson

from serve.config import AutoscalingConfig, BackpressureConfig, RequestRouterConfig


@dataclasses.dataclass(frozen=True, slots=True)
class DeploymentID:
    """A deployment, named within its application."""

    name: str
    app_name: str = "default"

    def __str__(self) -> str:
        return f"{self.app_name}.{self.name}"


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaID:
    """One replica: ``unique_id`` is a short random tag, unique within its deployment."""

    unique_id: str
    deployment_id: DeploymentID

    @classmethod
    def new(cls, deployment_id: DeploymentID) -> ReplicaID:
        return cls(secrets.token_hex(4), deployment_id)

    @classmethod
    def parse(cls, full_id: str) -> ReplicaID:
        app, name, unique = full_id.split("#")
        return cls(unique, DeploymentID(name, app))

    def to_full_id_str(self) -> str:
        return f"{self.deployment_id.app_name}#{self.deployment_id.name}#{self.unique_id}"

    def __str__(self) -> str:
        return self.to_full_id_str()

    def __repr__(self) -> str:  # as Ray's ReplicaID shows itself
        return (
            f"Replica(id='{self.unique_id}', deployment='{self.deployment_id.name}', "
            f"app='{self.deployment_id.app_name}')"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """An application the proxy serves: HTTP requests under ``route_prefix`` ("" for none:
    gRPC only) and gRPC calls naming the application go to its ingress."""

    route_prefix: str
    app_name: str
    ingress: str


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyInfo:
    """A serve-proxy process as it describes itself to the controller."""

    node_id: str
    pid: int
    http_address: str
    grpc_address: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """A running replica as a router sees it."""

    replica_id: str
    address: str
    host: str = ""
    max_ongoing_requests: int = 5
    model_ids: frozenset[str] = frozenset()
    routing_stats_json: bytes = b""  # what record_routing_stats() last returned, as JSON
    ingress_http_address: str = ""  # where it serves HTTP itself (direct ingress), or ""
    ingress_grpc_address: str = ""  # where it serves gRPC itself (direct ingress), or ""


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaSet:
    """The routable state of one deployment at one version."""

    version: int
    exists: bool
    replicas: tuple[ReplicaInfo, ...] = ()
    max_queued_requests: int = -1
    max_ongoing_requests: int = 5
    autoscaling: bool = False
    metrics_interval_s: float = 0.0
    unavailable: str = ""  # why requests cannot be served now (a failed deploy); "": they can
    request_router: RequestRouterConfig | None = None  # a custom router; None: the default
    backpressure: BackpressureConfig | None = None  # how the proxy answers a dropped request


class _Status(enum.StrEnum):
    """A status name, shown as itself by str() and repr() (as in Ray's status output)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


class ApplicationStatus(_Status):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(_Status):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class DeploymentStatusTrigger(_Status):
    UNSPECIFIED = "UNSPECIFIED"
    CONFIG_UPDATE_STARTED = "CONFIG_UPDATE_STARTED"
    CONFIG_UPDATE_COMPLETED = "CONFIG_UPDATE_COMPLETED"
    UPSCALE_COMPLETED = "UPSCALE_COMPLETED"
    DOWNSCALE_COMPLETED = "DOWNSCALE_COMPLETED"
    AUTOSCALING = "AUTOSCALING"
    REPLICA_STARTUP_FAILED = "REPLICA_STARTUP_FAILED"
    HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    DELETING = "DELETING"


class ReplicaState(_Status):
    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
    """The options of one deployment, validated."""

    num_replicas: int | None = 1  # None when autoscaling
    max_ongoing_requests: int = 5
    max_queued_requests: int = -1
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    max_constructor_retry_count: int = 20
    logging_config: Any = None
    ray_actor_options: Any = None  # resources and runtime_env, as Ray spells them (JSON types)
    max_replicas_per_node: int | None = None  # placement: at most this many on one node
    request_router_config: RequestRouterConfig | None = None  # None: power of two choices
    # Rollouts (Ray's knobs): replace at most max(int(pct * target), 1) replicas at a time;
    # with max_surge_percent > 0, start replacements first, up to ceil(target * pct / 100)
    # replicas above the target.
    rolling_update_percentage: float = 0.2
    max_surge_percent: float = 0.0
    # The HTTP answer to a request dropped by max_queued_requests (None: 503, no Retry-After).
    backpressure_config: BackpressureConfig | None = None
    gang_scheduling_config: Any = None  # serve.gang.GangSchedulingConfig.to_dict(), or None

    def __post_init__(self) -> None:
        router: Any = self.request_router_config
        if router is not None and not isinstance(router, RequestRouterConfig):
            object.__setattr__(
                self, "request_router_config", RequestRouterConfig.from_value(router)
            )

    def user_config_json(self) -> bytes | None:
        if self.user_config is None:
            return None
        return encode_user_config(self.user_config)

    def initial_replicas(self) -> int:
        if self.autoscaling_config is not None:
            return self.autoscaling_config.start_replicas()
        assert self.num_replicas is not None
        return self.num_replicas


def encode_user_config(value: Any) -> bytes:
    """Canonical JSON of a user_config: equal configs give equal bytes."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise TypeError(
            f"user_config must be JSON-serializable (dicts with string keys, lists, strings, "
            f"numbers, booleans, None); {exc}."
        ) from exc


@dataclasses.dataclass(frozen=True)
class DeploymentSpec:
    """One deployment as the driver sends it: opaque code bytes plus its config."""

    name: str
    serialized_callable: bytes
    serialized_init_args: bytes
    code_version: str
    config: DeploymentConfig


@dataclasses.dataclass(frozen=True)
class CodeEnv:
    """The driver's working directory and import path, mirrored by replicas."""

    cwd: str
    sys_path: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Failure:
    """A failure reported by a replica: readable text plus the pickled exception, if any.

    ``health_check``: the user's ``check_health`` raised (the replica itself started).
    """

    message: str
    traceback: str = ""
    pickled: bytes = b""
    health_check: bool = False
