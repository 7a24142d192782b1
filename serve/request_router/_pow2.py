"""``PowerOfTwoChoicesRequestRouter``: serve's default router, seen through Ray's interface.

Handles of a deployment that uses it (the default) never call it: they route by the same rule
on a faster path (``serve._router``). It is here for routers that subclass it, and so that
naming it in ``request_router_config`` means the default.
"""

from __future__ import annotations

import random

from serve._policy import sample_two
from serve.request_router._base import RequestRouter
from serve.request_router._common import PendingRequest
from serve.request_router._mixins import FIFOMixin, LocalityMixin, MultiplexMixin
from serve.request_router._replica import RunningReplica


class PowerOfTwoChoicesRequestRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Two replicas sampled at random among the preferred candidates (holding the request's
    multiplexed model, else on this node); the one with the shorter queue wins."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._rng = random.Random()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request)
        else:
            ids = self.apply_locality_routing(pending_request)
        candidates = [r for r in candidate_replicas if r.replica_id in ids]
        if not candidates:
            return []
        return [sample_two(candidates, self._rng)]
