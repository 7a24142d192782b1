"""``RequestRouter``: the interface of a request router, and the loop that drives one.

A router ranks replicas (``choose_replicas``); serve then takes, rank by rank, the replica with
the shortest known queue below its ``max_ongoing_requests``, asking replicas whose queue
length is unknown or looks full (a probe), and backs off when no rank has room. This is Ray's
contract for custom routers; serve's default, power of two choices, takes a faster path of its
own and only looks like one of these from outside.
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from serve._policy import (
    BACKOFF_MULTIPLIER,
    INITIAL_BACKOFF_S,
    MAX_BACKOFF_S,
    MAX_PROBE_DEADLINE_S,
    PROBE_DEADLINE_S,
)
from serve.request_router._common import PendingRequest, ReplicaQueueLengthCache, ReplicaResult
from serve.request_router._replica import RunningReplica

logger = logging.getLogger(__name__)

DEFAULT_CHOOSE_REPLICAS_TIMEOUT_S = 10.0
_MAX_IMMEDIATE_PASSES = 3


def router_class_of(config: Any) -> type[RequestRouter]:
    """The ``RequestRouter`` subclass a ``RequestRouterConfig`` names (``TypeError`` if it
    names something else; ``ImportError`` if it cannot be loaded here)."""
    router_class = config.get_request_router_class()
    if not (isinstance(router_class, type) and issubclass(router_class, RequestRouter)):
        raise TypeError(
            f"request_router_class {config.request_router_class!r} must be a subclass of "
            "serve.request_router.RequestRouter (implementing choose_replicas), got "
            f"{router_class!r}."
        )
    return router_class


class RouterFailure(Exception):
    """A custom router's ``choose_replicas`` raised, timed out or returned something unusable.

    Serve catches it and routes the request by power of two choices instead.
    """


class RequestRouter(ABC):
    """Decides which replica serves each request of a deployment (Ray's ``RequestRouter``).

    Subclass it and implement ``choose_replicas``; name the class in
    ``request_router_config``. It runs in every process that routes to the deployment.

    Example::

        class FirstReplica(RequestRouter):
            async def choose_replicas(self, candidate_replicas, pending_request=None):
                return [sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)[:1]]
    """

    initial_backoff_s = INITIAL_BACKOFF_S
    backoff_multiplier = BACKOFF_MULTIPLIER
    max_backoff_s = MAX_BACKOFF_S
    queue_len_response_deadline_s = PROBE_DEADLINE_S
    max_queue_len_response_deadline_s = MAX_PROBE_DEADLINE_S
    max_num_routing_tasks_cap = 50
    # Serve's own bound: a choose_replicas call taking longer falls back to the default.
    choose_replicas_timeout_s = DEFAULT_CHOOSE_REPLICAS_TIMEOUT_S

    def __init__(
        self,
        deployment_id: Any = None,
        handle_source: Any = None,
        self_actor_id: str | None = None,
        self_actor_handle: Any = None,
        use_replica_queue_len_cache: bool = True,
        get_curr_time_s: Callable[[], float] | None = None,
        create_replica_wrapper_func: Callable[[Any], RunningReplica] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._deployment_id = deployment_id
        self._handle_source = handle_source
        self._use_replica_queue_len_cache = use_replica_queue_len_cache
        self._create_replica_wrapper_func = create_replica_wrapper_func
        self._replicas: dict[Any, RunningReplica] = {}
        self._replica_id_set: set[Any] = set()
        self._replica_queue_len_cache = ReplicaQueueLengthCache(get_curr_time_s=get_curr_time_s)
        self._replicas_updated: asyncio.Event | None = None

    def initialize_state(self, **kwargs: Any) -> None:  # noqa: B027 - optional hook
        """Called once with ``request_router_config.request_router_kwargs``."""

    # What serve tells the router.

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The replicas that can take requests now (a new replica set)."""
        for hook in ("_update_colocated_replica_ids_with_replicas",
                     "_update_multiplexed_model_ids_with_replicas"):  # fmt: skip
            update = getattr(self, hook, None)
            if update is not None:
                update(replicas)
        self._replicas = {r.replica_id: r for r in replicas}
        self._replica_id_set = set(self._replicas)
        self._replica_queue_len_cache.remove_inactive_replicas(
            active_replica_ids=self._replica_id_set
        )
        if self._replicas:
            self._replicas_updated_event.set()

    def on_replica_actor_died(self, replica_id: Any) -> None:
        """Drop a replica that died (its connection broke) from consideration."""
        self._replicas.pop(replica_id, None)
        self._replica_id_set.discard(replica_id)
        discard = getattr(self, "_discard_colocated_replica_ids_on_replica_actor_died", None)
        if discard is not None:
            discard(replica_id)

    def on_replica_actor_unavailable(self, replica_id: Any) -> None:
        self._replica_queue_len_cache.invalidate_key(replica_id)

    def on_request_routed(  # noqa: B027 - optional hook
        self, pending_request: PendingRequest, replica_id: Any, result: ReplicaResult
    ) -> None:
        """Called once a request was sent to ``replica_id``."""

    # What routers use.

    @property
    def curr_replicas(self) -> dict[Any, RunningReplica]:
        return self._replicas

    @property
    def app_name(self) -> str:
        return str(getattr(self._deployment_id, "app_name", ""))

    @property
    def replica_queue_len_cache(self) -> ReplicaQueueLengthCache:
        return self._replica_queue_len_cache

    @property
    def num_pending_requests(self) -> int:
        return 0

    def select_available_replicas(
        self, candidates: list[RunningReplica] | None = None
    ) -> list[RunningReplica]:
        """The candidates (all replicas by default) whose known queue is not full; a replica
        whose queue length is unknown counts as available. Never probes."""
        if candidates is None:
            candidates = list(self._replicas.values())
        cache = self._replica_queue_len_cache
        available = []
        for replica in candidates:
            queue_len = cache.get(replica.replica_id)
            if queue_len is None or queue_len < replica.max_ongoing_requests:
                available.append(replica)
        return available

    @abstractmethod
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank the candidates for this request: a list of ranks, most preferred first."""

    # The loop serve drives for each request.

    @property
    def _replicas_updated_event(self) -> asyncio.Event:
        if self._replicas_updated is None:  # built lazily: the constructor captures no loop
            self._replicas_updated = asyncio.Event()
        return self._replicas_updated

    async def _backoff(self, attempt: int) -> None:
        delay_s = min(self.initial_backoff_s * self.backoff_multiplier**attempt, self.max_backoff_s)
        await asyncio.sleep(delay_s)

    async def _ranks(self, pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        """``choose_replicas``, bounded in time and checked; RouterFailure otherwise."""
        name = type(self).__name__
        try:
            async with asyncio.timeout(self.choose_replicas_timeout_s):
                ranks = await self.choose_replicas(
                    candidate_replicas=list(self._replicas.values()),
                    pending_request=pending_request,
                )
        except TimeoutError as exc:
            raise RouterFailure(
                f"{name}.choose_replicas did not return within {self.choose_replicas_timeout_s}s"
            ) from exc
        except Exception as exc:
            raise RouterFailure(
                f"{name}.choose_replicas raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(ranks, list | tuple) or not all(
            isinstance(rank, list | tuple) for rank in ranks
        ):
            raise RouterFailure(
                f"{name}.choose_replicas must return a list of lists of replicas (ranks), got "
                f"{ranks!r}"
            )
        return [list(rank) for rank in ranks]

    async def _choose_replicas_with_backoff(
        self, pending_request: PendingRequest | None = None
    ) -> AsyncIterator[list[RunningReplica]]:
        """Yield the router's ranks, pass after pass: wait while there are no replicas, and
        back off between passes that found no room (not after the first, and not while the
        router asks to retry at once: ``routing_context.should_backoff`` False)."""
        entered_backoff = False
        attempt = 0
        immediate = 0  # passes retried at once; bounded, so a router never spins the loop
        while True:
            while not self._replicas:
                self._replicas_updated_event.clear()
                await self._replicas_updated_event.wait()
            yielded = False
            for rank in await self._ranks(pending_request):
                if rank:
                    yielded = True
                    yield rank
            at_once = pending_request is not None and (
                not pending_request.routing_context.should_backoff
            )
            if yielded and at_once and immediate < _MAX_IMMEDIATE_PASSES:
                immediate += 1
                continue
            immediate = 0
            if not entered_backoff:
                entered_backoff = True
                await asyncio.sleep(0)
                continue
            await self._backoff(attempt)
            attempt += 1

    async def _probe_queue_lens(
        self, replicas: Sequence[RunningReplica], backoff_index: int
    ) -> list[tuple[RunningReplica, int | None]]:
        """Ask each replica its queue length, within a deadline doubling with
        ``backoff_index``; None for those that did not answer in time."""
        if not replicas:
            return []
        ceiling = max(self.queue_len_response_deadline_s, self.max_queue_len_response_deadline_s)
        exponent = min(backoff_index, 64)
        deadline_s = min(self.queue_len_response_deadline_s * 2**exponent, ceiling)
        tasks = [asyncio.ensure_future(r.get_queue_len(deadline_s=deadline_s)) for r in replicas]
        try:
            await asyncio.wait(tasks, timeout=deadline_s)
        finally:
            for task in tasks:
                task.cancel()
        result: list[tuple[RunningReplica, int | None]] = []
        for replica, task in zip(replicas, tasks, strict=True):
            if not task.done() or task.cancelled() or task.exception() is not None:
                result.append((replica, None))
                if task.done() and not task.cancelled():
                    logger.debug("Probing %r failed: %s", replica.replica_id, task.exception())
                continue
            queue_len = task.result()
            self._replica_queue_len_cache.update(replica.replica_id, queue_len)
            result.append((replica, queue_len))
        return result

    async def _select_from_candidate_replicas(
        self, candidates: list[RunningReplica], backoff_index: int
    ) -> RunningReplica | None:
        """The candidate with the shortest queue below its limit, from the cache, else from
        probing the replicas the cache knows nothing of (or thinks full); None if none."""
        lowest = math.inf
        chosen: Any = None
        to_probe: list[RunningReplica] = []
        if self._use_replica_queue_len_cache:
            cache = self._replica_queue_len_cache
            for replica in candidates:
                queue_len = cache.get(replica.replica_id)
                if queue_len is None or queue_len >= replica.max_ongoing_requests:
                    to_probe.append(replica)
                elif queue_len < lowest:
                    lowest, chosen = queue_len, replica.replica_id
        else:
            to_probe = list(candidates)
        if chosen is None:
            for replica, queue_len in await self._probe_queue_lens(to_probe, backoff_index):
                limit = replica.max_ongoing_requests
                if queue_len is not None and queue_len < limit and queue_len < lowest:
                    lowest, chosen = queue_len, replica.replica_id
        return self._replicas.get(chosen)

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        """Route one request: the replica it should go to (waits, backing off, for room)."""
        backoff_index = 0
        passes = self._choose_replicas_with_backoff(pending_request)
        try:
            async for candidates in passes:
                replica = await self._select_from_candidate_replicas(candidates, backoff_index)
                if replica is not None:
                    return replica
                backoff_index += 1
        finally:
            await passes.aclose()  # type: ignore[attr-defined]
        raise AssertionError("unreachable: the passes never end")
