"""Ray's ``ray.serve.context`` names that user code reaches for.

``_get_serve_request_context()`` returns the request being served (its ``request_id``,
``app_name``, ``multiplexed_model_id`` ...); as in Ray, an empty one (``request_id == ""``)
outside a request and inside a ``@serve.batch`` method, where
``_get_serve_batch_request_context()`` lists the batch's requests instead.
"""

from __future__ import annotations

from serve._context import (
    ReplicaContext,
    RequestContext,
    batch_requests,
    current_request,
    get_replica_context,
    replica_context,
)

__all__ = [
    "_get_internal_replica_context",
    "_get_serve_batch_request_context",
    "_get_serve_request_context",
    "get_replica_context",
]


def _get_internal_replica_context() -> ReplicaContext | None:
    """The replica context, or None outside a replica (Ray's internal spelling, which its
    request-router documentation uses to read ``replica_id``)."""
    return replica_context()


def _get_serve_request_context() -> RequestContext:
    request = current_request()
    if request is None or batch_requests():
        return RequestContext(request_id="")
    return request


def _get_serve_batch_request_context() -> list[RequestContext]:
    return list(batch_requests())
