"""The few names of Ray's private ``ray.serve._private.common`` that Ray's own documentation
imports (application-level autoscaling policies key their decisions by ``DeploymentID``), so
those examples run with only their import changed. Nothing else of Ray's internals is here.
"""

from __future__ import annotations

import enum

from serve._autoscaling_context import TimeSeries, TimeStampedValue
from serve._models import DeploymentID, ReplicaID
from serve.request_router import RequestMetadata

__all__ = [
    "DeploymentHandleSource",
    "DeploymentID",
    "ReplicaID",
    "RequestMetadata",
    "TimeSeries",
    "TimeStampedValue",
]


class DeploymentHandleSource(enum.StrEnum):
    """Where a handle (and so a request router) lives."""

    UNKNOWN = "UNKNOWN"
    PROXY = "PROXY"
    REPLICA = "REPLICA"
