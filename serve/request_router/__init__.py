"""Custom request routing (Ray's ``ray.serve.request_router``).

Subclass ``RequestRouter``, implement ``choose_replicas`` (rank the candidate replicas for a
request), and name the class in a deployment's ``request_router_config``. Serve keeps routing
by power of two choices unless told otherwise.

Example::

    from serve.request_router import PendingRequest, RequestRouter, RunningReplica

    class ByUser(RequestRouter):
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            replicas = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            user = pending_request.kwargs.get("user", "") if pending_request else ""
            return [[replicas[hash(user) % len(replicas)]]] if replicas else []

    @serve.deployment(request_router_config={"request_router_class": ByUser})
    class Model: ...
"""

from serve._models import ReplicaID
from serve.request_router._base import RequestRouter
from serve.request_router._common import (
    PendingRequest,
    ReplicaQueueLengthCache,
    ReplicaResult,
    RequestMetadata,
    RequestRoutingContext,
)
from serve.request_router._mixins import FIFOMixin, LocalityMixin, LocalityScope, MultiplexMixin
from serve.request_router._pow2 import PowerOfTwoChoicesRequestRouter
from serve.request_router._replica import RunningReplica

__all__ = [
    "FIFOMixin",
    "LocalityMixin",
    "LocalityScope",
    "MultiplexMixin",
    "PendingRequest",
    "PowerOfTwoChoicesRequestRouter",
    "ReplicaID",
    "ReplicaQueueLengthCache",
    "ReplicaResult",
    "RequestMetadata",
    "RequestRouter",
    "RequestRoutingContext",
    "RunningReplica",
]
