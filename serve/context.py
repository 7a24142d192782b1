"""Ray's ``ray.serve.context`` names that user code reaches for.

``_get_serve_request_context()`` returns the request being served (its ``request_id``,
``app_name``, ``multiplexed_model_id`` ...), or ``None`` outside a request.
"""

from __future__ import annotations

from serve._context import RequestContext, current_request, get_replica_context

__all__ = ["_get_serve_request_context", "get_replica_context"]


def _get_serve_request_context() -> RequestContext | None:
    return current_request()
