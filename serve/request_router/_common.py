"""The data a request router works with: a request waiting for a replica, and queue lengths.

Names and fields as Ray's ``ray.serve.request_router`` has them, so routers written for Ray run
here unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from serve._models import ReplicaID
from serve._policy import QUEUE_LENGTH_TTL_S, QueueLengths


@dataclasses.dataclass
class RequestMetadata:
    """What is known of a request besides its arguments."""

    request_id: str
    internal_request_id: str = ""
    call_method: str = "__call__"
    route: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    is_streaming: bool = False


@dataclasses.dataclass
class RequestRoutingContext:
    """What earlier routing passes for one request tried (the mixins keep it here)."""

    multiplexed_start_matching_time: float | None = None
    tried_fewest_multiplexed_models: bool = False
    tried_first_multiplexed_models: bool = False
    tried_same_node: bool = False
    tried_same_az: bool = False
    should_backoff: bool = False


class PendingRequest:
    """A request waiting for a replica: its arguments, metadata and routing context.

    ``args`` / ``kwargs`` are the caller's values; for requests made by serve itself they are
    decoded only if the router reads them.
    """

    def __init__(
        self,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        metadata: RequestMetadata | None = None,
        created_at: float | None = None,
        routing_context: RequestRoutingContext | None = None,
        *,
        load_arguments: Callable[[], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    ) -> None:
        self._args: list[Any] | None = list(args) if args is not None else None
        self._kwargs = kwargs
        self._load = load_arguments
        self.metadata = metadata if metadata is not None else RequestMetadata(request_id="")
        self.created_at = time.time() if created_at is None else created_at
        self.routing_context = routing_context or RequestRoutingContext()
        self.resolved = True

    def _loaded(self) -> None:
        if self._args is None:
            if self._load is not None:
                args, kwargs = self._load()
                self._args, self._kwargs = list(args), kwargs
            else:
                self._args = []
        if self._kwargs is None:
            self._kwargs = {}

    @property
    def args(self) -> list[Any]:
        self._loaded()
        assert self._args is not None
        return self._args

    @property
    def kwargs(self) -> dict[str, Any]:
        self._loaded()
        assert self._kwargs is not None
        return self._kwargs

    def __repr__(self) -> str:
        return f"PendingRequest({self.metadata.request_id[:8]}, {self.metadata.call_method})"


def _key(replica_id: Any) -> str:
    return replica_id.to_full_id_str() if isinstance(replica_id, ReplicaID) else str(replica_id)


class ReplicaQueueLengthCache:
    """Ongoing requests per replica as last known (entries expire after a while).

    Inside serve it is the process's own view of the deployment: the count each replica
    reported in its last reply, plus the requests sent to it since.
    """

    def __init__(
        self,
        *,
        staleness_timeout_s: float = QUEUE_LENGTH_TTL_S,
        get_curr_time_s: Callable[[], float] | None = None,
        queue_lens: QueueLengths | None = None,
    ) -> None:
        self._now = get_curr_time_s or time.monotonic
        self._lens = queue_lens if queue_lens is not None else QueueLengths(staleness_timeout_s)

    def get(self, replica_id: Any) -> int | None:
        return self._lens.estimate(_key(replica_id), self._now())

    def update(self, replica_id: Any, queue_len: int) -> None:
        self._lens.report(_key(replica_id), queue_len, self._now())

    def invalidate_key(self, replica_id: Any) -> None:
        self._lens.invalidate(_key(replica_id))

    def remove_inactive_replicas(self, *, active_replica_ids: Iterable[Any]) -> None:
        active = {_key(r) for r in active_replica_ids}
        for known in self._lens.known() - active:
            self._lens.forget(known)


class ReplicaResult:
    """The outcome to come of a routed request (given to ``on_request_routed``)."""

    def __init__(
        self,
        request_id: str,
        replica_id: ReplicaID,
        add_done_callback: Callable[[Callable[[Any], None]], None] | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.replica_id = replica_id
        self._add_done_callback = add_done_callback
        self._cancel = cancel

    def add_done_callback(self, callback: Callable[[ReplicaResult], None]) -> None:
        """Call ``callback(self)`` once the request has finished (whatever the outcome)."""
        if self._add_done_callback is not None:
            self._add_done_callback(lambda _: callback(self))

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel()

    def __repr__(self) -> str:
        return f"ReplicaResult({self.request_id[:8]} on {self.replica_id!r})"
