"""Helpers a request router can mix in (Ray's ``LocalityMixin``, ``MultiplexMixin``,
``FIFOMixin``): candidate sets and rankings by node and by multiplexed model."""

from __future__ import annotations

import enum
import random
import time
from collections import defaultdict
from typing import Any

from serve.request_router._common import PendingRequest
from serve.request_router._replica import RunningReplica

MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S = 1.0


def three_ranks(
    replicas: list[RunningReplica], first: set[Any], second: set[Any]
) -> list[list[RunningReplica]]:
    """The replicas whose id is in ``first``, then in ``second``, then the others."""
    ranks: list[list[RunningReplica]] = [[], [], []]
    for replica in replicas:
        rank = 0 if replica.replica_id in first else 1 if replica.replica_id in second else 2
        ranks[rank].append(replica)
    return ranks


class LocalityScope(enum.StrEnum):
    NODE = "NODE"
    AVAILABILITY_ZONE = "AVAILABILITY_ZONE"


class LocalityMixin:
    """Prefer replicas on the router's own node (then its availability zone)."""

    def __init__(
        self,
        self_node_id: str | None = None,
        prefer_local_node_routing: bool = False,
        prefer_local_az_routing: bool = False,
        self_availability_zone: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._self_node_id = self_node_id
        self._prefer_local_node_routing = prefer_local_node_routing
        self._prefer_local_az_routing = prefer_local_az_routing
        self._self_availability_zone = self_availability_zone
        self._colocated_replica_ids: defaultdict[LocalityScope, set[Any]] = defaultdict(set)
        self._replica_id_set: set[Any] = set()

    def _discard_colocated_replica_ids_on_replica_actor_died(self, replica_id: Any) -> None:
        for ids in self._colocated_replica_ids.values():
            ids.discard(replica_id)

    def _update_colocated_replica_ids_with_replicas(self, replicas: list[RunningReplica]) -> None:
        colocated: defaultdict[LocalityScope, set[Any]] = defaultdict(set)
        for replica in replicas:
            if self._self_node_id is not None and replica.node_id == self._self_node_id:
                colocated[LocalityScope.NODE].add(replica.replica_id)
            zone = self._self_availability_zone
            if zone is not None and replica.availability_zone == zone:
                colocated[LocalityScope.AVAILABILITY_ZONE].add(replica.replica_id)
        self._colocated_replica_ids = colocated

    def apply_locality_routing(self, pending_request: PendingRequest | None = None) -> set[Any]:
        """Candidate replica ids: this node's once, then this zone's once, then all."""
        if pending_request is None:
            return self._replica_id_set
        context = pending_request.routing_context
        node = self._colocated_replica_ids[LocalityScope.NODE]
        zone = self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]
        if self._prefer_local_node_routing and not context.tried_same_node and node:
            context.tried_same_node = True
            context.should_backoff = False
            return node
        if self._prefer_local_az_routing and not context.tried_same_az and zone:
            context.tried_same_az = True
            context.should_backoff = False
            return zone
        context.should_backoff = True
        return self._replica_id_set

    def rank_replicas_via_locality(
        self, replicas: list[RunningReplica]
    ) -> list[list[RunningReplica]]:
        """Three ranks: this node's replicas, this zone's, the others."""
        node = self._colocated_replica_ids[LocalityScope.NODE]
        zone = self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]
        return three_ranks(replicas, node, zone)


class MultiplexMixin:
    """Prefer replicas that hold the request's multiplexed model (then the least loaded)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._multiplexed_model_id_to_replica_ids: defaultdict[str, set[Any]] = defaultdict(set)
        self._multiplexed_model_id_fallback_match: set[str] = set()
        self._replica_id_set: set[Any] = set()
        self._replicas: dict[Any, RunningReplica] = {}

    def _update_multiplexed_model_ids_with_replicas(self, replicas: list[RunningReplica]) -> None:
        by_model: defaultdict[str, set[Any]] = defaultdict(set)
        for replica in replicas:
            for model_id in replica.multiplexed_model_ids:
                by_model[model_id].add(replica.replica_id)
        self._multiplexed_model_id_to_replica_ids = by_model

    def _get_replica_ids_with_fewest_multiplexed_models(self) -> set[Any]:
        replicas = list(self._replicas.values())
        if not replicas:
            return set()
        fewest = min(len(r.multiplexed_model_ids) for r in replicas)
        return {r.replica_id for r in replicas if len(r.multiplexed_model_ids) == fewest}

    @property
    def _multiplexed_matching_timeout(self) -> float:
        return random.uniform(
            MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S, 2 * MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S
        )

    def apply_multiplex_routing(self, pending_request: PendingRequest | None = None) -> set[Any]:
        """Candidate replica ids: those holding the model (for a while), then the ones holding
        the fewest models (once), then all."""
        if pending_request is None:
            return self._replica_id_set
        context = pending_request.routing_context
        if not context.multiplexed_start_matching_time:
            context.multiplexed_start_matching_time = time.time()
        model_id = pending_request.metadata.multiplexed_model_id
        elapsed_s = time.time() - context.multiplexed_start_matching_time
        if elapsed_s < self._multiplexed_matching_timeout:
            candidates = self._multiplexed_model_id_to_replica_ids.get(model_id)
            if (
                not candidates and model_id not in self._multiplexed_model_id_fallback_match
            ) or context.tried_first_multiplexed_models:
                candidates = self._get_replica_ids_with_fewest_multiplexed_models()
                self._multiplexed_model_id_fallback_match.add(model_id)
            elif candidates:
                self._multiplexed_model_id_fallback_match.discard(model_id)
            context.tried_first_multiplexed_models = True
        elif not context.tried_fewest_multiplexed_models:
            candidates = self._get_replica_ids_with_fewest_multiplexed_models()
            context.tried_fewest_multiplexed_models = True
        else:
            candidates = self._replica_id_set
        context.should_backoff = True
        return candidates or set()

    def rank_replicas_via_multiplex(
        self, replicas: list[RunningReplica], multiplexed_model_id: str
    ) -> list[list[RunningReplica]]:
        """Three ranks: replicas holding the model, those holding the fewest models, others."""
        holding = self._multiplexed_model_id_to_replica_ids.get(multiplexed_model_id, set())
        return three_ranks(
            replicas, holding, self._get_replica_ids_with_fewest_multiplexed_models()
        )


class FIFOMixin:
    """Serve requests in arrival order. Serve's routers always do, so this only marks it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
