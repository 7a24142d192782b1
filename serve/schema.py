"""The shape of ``serve.status()``, as in Ray's ``ray.serve.schema``.

Example::

    status = serve.status()
    assert status.applications["default"].status == "RUNNING"
    dep = status.applications["default"].deployments["Model"]
    print(dep.status, dep.replica_states)  # HEALTHY {'RUNNING': 2}
"""

from __future__ import annotations

import dataclasses

from serve._models import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ReplicaState,
)

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "DeploymentStatusTrigger",
    "ProxyDetails",
    "ReplicaState",
    "ServeStatus",
]


@dataclasses.dataclass(frozen=True)
class DeploymentStatusOverview:
    """One deployment: its status, why it has it, and how many replicas are in each state."""

    status: DeploymentStatus
    status_trigger: DeploymentStatusTrigger
    replica_states: dict[ReplicaState, int]
    message: str = ""


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


@dataclasses.dataclass(frozen=True)
class ServeStatus:
    """Every application the controller knows, and its proxies (node id -> status, as Ray;
    ``proxy_details`` adds where each one listens)."""

    applications: dict[str, ApplicationStatusOverview] = dataclasses.field(default_factory=dict)
    proxies: dict[str, str] = dataclasses.field(default_factory=dict)
    target_capacity: float | None = None
    proxy_details: dict[str, ProxyDetails] = dataclasses.field(default_factory=dict)
