"""The shape of ``serve.status()``, as in Ray's ``ray.serve.schema``.

Example::

    status = serve.status()
    assert status.applications["default"].status == "RUNNING"
    dep = status.applications["default"].deployments["Model"]
    print(dep.status, dep.replica_states)  # HEALTHY {'RUNNING': 2}
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from serve._models import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ReplicaState,
)
from serve._settings import settings

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "DeploymentStatusTrigger",
    "LoggingConfig",
    "ProxyDetails",
    "ReplicaRank",
    "ReplicaState",
    "ScalingDecision",
    "ServeStatus",
    "TracingConfig",
]


class ReplicaRank(int):
    """A replica's rank among its deployment's replicas (Ray's ``ReplicaRank``).

    ``rank`` is 0 .. world_size - 1, unique among the deployment's live replicas (the lowest
    free one when the replica starts, kept for its life). Per-node ranks are not computed
    here: ``node_rank`` is 0 and ``local_rank`` equals ``rank`` unless given. It is also the
    ``int`` ``rank``, as it used to be here.

    Example::

        def reconfigure(self, user_config, rank: ReplicaRank):
            self.shard = rank.rank
    """

    node_rank: int
    local_rank: int

    def __new__(cls, rank: int, node_rank: int = 0, local_rank: int | None = None) -> ReplicaRank:
        self = super().__new__(cls, rank)
        self.node_rank = node_rank
        self.local_rank = rank if local_rank is None else local_rank
        return self

    @property
    def rank(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return (
            f"ReplicaRank(rank={int(self)}, node_rank={self.node_rank}, "
            f"local_rank={self.local_rank})"
        )


_LOG_ENCODINGS = ("TEXT", "JSON")


@dataclasses.dataclass
class LoggingConfig:
    """Logging options of a deployment, an application or serve itself (Ray's fields).

    Example::

        @serve.deployment(logging_config=LoggingConfig(encoding="JSON", log_level="DEBUG"))
        class Model: ...
    """

    encoding: str = "TEXT"
    log_level: int | str = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        encoding = str(self.encoding).upper()
        if encoding not in _LOG_ENCODINGS:
            raise ValueError(
                f"LoggingConfig: encoding must be one of {list(_LOG_ENCODINGS)}, got "
                f"{self.encoding!r}."
            )
        self.encoding = encoding
        level: Any = self.log_level
        if isinstance(level, str):
            level = level.upper()
            if logging.getLevelName(level) == f"Level {level}":
                raise ValueError(f"LoggingConfig: log_level {level!r} is not a logging level.")
        self.log_level = level
        if not isinstance(self.enable_access_log, bool):
            raise TypeError("LoggingConfig: enable_access_log must be a bool.")

    def dict(self) -> dict[str, Any]:
        """The fields as a dict (pydantic's spelling, which Ray's LoggingConfig has)."""
        return dataclasses.asdict(self)


# The exporter that appends spans, one JSON object a line, under the logs directory's spans/.
DEFAULT_TRACING_EXPORTER_IMPORT_PATH = "serve._tracing:default_tracing_exporter"


@dataclasses.dataclass
class TracingConfig:
    """OpenTelemetry tracing of serve's proxies and replicas (Ray's ``TracingConfig``).

    The defaults come from ``SERVE_TRACING_EXPORTER_IMPORT_PATH`` (tracing is on when it is
    set) and ``SERVE_TRACING_SAMPLING_RATIO`` (0.01). Enabled without an exporter, spans go to
    the default exporter: JSON lines under the logs directory's ``spans/`` folder. An exporter
    is a function taking no arguments that returns a list of OpenTelemetry ``SpanProcessor``s.

    Example::

        serve.start(tracing_config=TracingConfig(enabled=True, sampling_ratio=1.0))
    """

    enabled: bool = dataclasses.field(
        default_factory=lambda: settings().tracing_exporter_import_path != ""
    )
    exporter_import_path: str = dataclasses.field(
        default_factory=lambda: settings().tracing_exporter_import_path
    )
    sampling_ratio: float = dataclasses.field(
        default_factory=lambda: settings().tracing_sampling_ratio
    )

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TypeError(f"TracingConfig: enabled must be a bool, got {self.enabled!r}.")
        if not isinstance(self.exporter_import_path, str):
            raise TypeError(
                "TracingConfig: exporter_import_path must be an import path such as "
                f"'module:function', got {self.exporter_import_path!r}."
            )
        ratio = self.sampling_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float):
            raise TypeError(f"TracingConfig: sampling_ratio must be a number, got {ratio!r}.")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"sampling_ratio must be between 0.0 and 1.0, got {ratio}.")
        self.sampling_ratio = float(ratio)
        if self.enabled and not self.exporter_import_path:
            self.exporter_import_path = DEFAULT_TRACING_EXPORTER_IMPORT_PATH

    @classmethod
    def from_value(cls, value: TracingConfig | dict[str, Any]) -> TracingConfig:
        """A TracingConfig from itself or a dict of its fields (a config file's)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"tracing_config must be a TracingConfig or a dict, got {value!r}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"tracing_config: unknown field(s) {unknown}; known: {sorted(known)}.")
        return cls(**value)

    def dict(self) -> dict[str, Any]:
        """The fields as a dict (pydantic's spelling, which Ray's TracingConfig has)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ScalingDecision:
    """One change of an autoscaled deployment's target replica count, and who decided it."""

    timestamp_s: float  # wall clock
    prev_num_replicas: int
    curr_num_replicas: int
    policy: str  # "default", or the custom policy's import path
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class DeploymentStatusOverview:
    """One deployment: its status, why it has it, and how many replicas are in each state.

    For an autoscaled deployment, ``autoscaling_policy`` names a custom policy deciding its
    replica count (empty: the default) and ``scaling_decisions`` lists its latest changes,
    the newest first.
    """

    status: DeploymentStatus
    status_trigger: DeploymentStatusTrigger
    replica_states: dict[ReplicaState, int]
    message: str = ""
    autoscaling_policy: str = ""
    scaling_decisions: tuple[ScalingDecision, ...] = ()


@dataclasses.dataclass(frozen=True)
class ApplicationStatusOverview:
    """One application and its deployments."""

    status: ApplicationStatus
    message: str
    last_deployed_time_s: float
    deployments: dict[str, DeploymentStatusOverview]
    route_prefix: str | None = None


@dataclasses.dataclass(frozen=True)
class ProxyDetails:
    """One node's serve-proxy: its status (Ray's ProxyStatus values) and where it listens."""

    status: str
    http_address: str = ""  # host:port
    grpc_address: str = ""  # host:port, empty when the gRPC proxy is off
    pid: int = 0
    message: str = ""  # why it is not healthy
    https: bool = False  # HTTPS on http_address (http_options' ssl_keyfile and ssl_certfile)


@dataclasses.dataclass(frozen=True)
class ServeStatus:
    """Every application the controller knows, and its proxies (node id -> status, as Ray;
    ``proxy_details`` adds where each one listens; ``dashboard_url`` is the controller's
    dashboard, empty when it serves none)."""

    applications: dict[str, ApplicationStatusOverview] = dataclasses.field(default_factory=dict)
    proxies: dict[str, str] = dataclasses.field(default_factory=dict)
    target_capacity: float | None = None
    proxy_details: dict[str, ProxyDetails] = dataclasses.field(default_factory=dict)
    dashboard_url: str = ""
