"""A custom request router (``request_router_config``) at work in this process.

One :class:`CustomRouting` per deployment per process, owned by its ``RoutingState``: it
builds the user's ``RequestRouter`` from the class the replica set carries, keeps it told of
the routable replicas (each a ``RunningReplica`` with the stats the controller published), and
asks it, request by request, where to send. Anything the user's router does wrong (raising,
hanging, returning nonsense, failing to load) is logged and the request is routed by power of
two choices instead: a broken router never fails requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from serve._exchange import Envelope
from serve._ingress import ASGI_METHOD, unpack_asgi_args
from serve._models import DeploymentID, ReplicaID, ReplicaInfo
from serve._policy import QueueLengths
from serve._serialization import decode_args
from serve._settings import settings
from serve.config import RequestRouterConfig
from serve.request_router import (
    PendingRequest,
    ReplicaQueueLengthCache,
    ReplicaResult,
    RequestMetadata,
    RunningReplica,
)
from serve.request_router._base import RouterFailure, router_class_of

logger = logging.getLogger(__name__)

FALLBACK_LOG_EVERY_S = 10.0

ProbeQueueLength = Callable[[ReplicaInfo, float], Awaitable[int]]


class Routed(Protocol):
    """What of a request (``serve._request.Request``) a custom router gets to see."""

    seq: int
    envelope: Envelope
    completion: Any  # a serve._sync.Completion

    @property
    def request_id(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def model_id(self) -> str: ...
    @property
    def stream(self) -> bool: ...
    def cancel(self) -> None: ...


class FallbackLog:
    """Says, at most every ``FALLBACK_LOG_EVERY_S``, that a router failed and how often."""

    def __init__(self, deployment_id: DeploymentID) -> None:
        self._deployment_id = deployment_id
        self._last_s = -FALLBACK_LOG_EVERY_S
        self._since = 0

    def failed(self, what: str, error: BaseException) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._last_s < FALLBACK_LOG_EVERY_S:
            return
        count, self._since, self._last_s = self._since, 0, now
        logger.warning(
            "Custom request router of %s failed (%s): %s. Routing by power of two choices "
            "instead (%d request(s) since the last report).",
            self._deployment_id,
            what,
            error,
            count,
            exc_info=error if count == 1 else None,
        )


def build(
    deployment_id: DeploymentID,
    config: RequestRouterConfig,
    queue_lens: QueueLengths,
    probe: ProbeQueueLength,
    node_id: str,
) -> CustomRouting | None:
    """The custom router of ``config``, or None (logged) if it cannot be built here."""
    try:
        return CustomRouting(deployment_id, config, queue_lens, probe, node_id)
    except Exception as exc:
        logger.error(
            "Could not set up the custom request router %r of %s: %s. Its requests are routed "
            "by power of two choices in this process.",
            config.request_router_class,
            deployment_id,
            exc,
            exc_info=exc,
        )
        return None


class CustomRouting:
    """The user's ``RequestRouter`` for one deployment, and what it needs from serve."""

    def __init__(
        self,
        deployment_id: DeploymentID,
        config: RequestRouterConfig,
        queue_lens: QueueLengths,
        probe: ProbeQueueLength,
        node_id: str,
    ) -> None:
        router = router_class_of(config)(
            deployment_id=deployment_id,
            handle_source=None,
            self_node_id=node_id,
            prefer_local_node_routing=False,
            use_replica_queue_len_cache=True,
        )
        # The router reads and updates this process's own queue-length estimates.
        router._replica_queue_len_cache = ReplicaQueueLengthCache(queue_lens=queue_lens)
        router.initial_backoff_s = config.initial_backoff_s
        router.backoff_multiplier = config.backoff_multiplier
        router.max_backoff_s = config.max_backoff_s
        router.choose_replicas_timeout_s = settings().choose_replicas_timeout_s
        router.initialize_state(**config.request_router_kwargs)
        self.config = config
        self.router = router
        self.log = FallbackLog(deployment_id)
        self._deployment_id = deployment_id
        self._probe = probe
        self._wrappers: dict[str, RunningReplica] = {}
        self._infos: dict[str, ReplicaInfo] = {}

    def update(self, replicas: Sequence[ReplicaInfo]) -> None:
        """The routable replicas changed (a new set, or one dropped)."""
        wrappers: dict[str, RunningReplica] = {}
        for info in replicas:
            known = self._wrappers.get(info.replica_id)
            wrappers[info.replica_id] = (
                known
                if known is not None and known.info == info
                else RunningReplica(info, self._probe)
            )
        for gone in self._wrappers.keys() - wrappers.keys():
            self._call("on_replica_actor_died", ReplicaID.parse(gone))
        self._wrappers = wrappers
        self._infos = {info.replica_id: info for info in replicas}
        self._call("update_replicas", list(wrappers.values()))

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.router, method)(*args)
        except Exception as exc:
            self.log.failed(method, exc)

    def routable(self, chosen: Any) -> ReplicaInfo | None:
        """The replica info behind what the router chose, if it is still routable."""
        replica_id = getattr(chosen, "replica_id", None)
        key = replica_id.to_full_id_str() if isinstance(replica_id, ReplicaID) else None
        return self._infos.get(key) if key is not None else None

    async def choose(self, pending: PendingRequest) -> Any:
        """Where the router sends ``pending`` (a RunningReplica); RouterFailure if it failed."""
        try:
            return await self.router._choose_replica_for_request(pending)
        except RouterFailure:
            raise
        except Exception as exc:  # raised by a router that overrides the serve-side loop
            raise RouterFailure(f"{type(self.router).__name__} raised {exc!r}") from exc

    def routed(self, pending: PendingRequest, request: Routed, info: ReplicaInfo) -> None:
        """Tell the router where the request went (``on_request_routed``)."""
        replica_id = ReplicaID.parse(info.replica_id)
        result = ReplicaResult(
            request.request_id,
            replica_id,
            add_done_callback=request.completion.add_done_callback,
            cancel=request.cancel,
        )
        self._call("on_request_routed", pending, replica_id, result)


def pending_view(request: Routed, app_name: str) -> PendingRequest:
    """``request`` as the router sees it; its arguments are decoded only if it reads them."""
    envelope = request.envelope

    def load() -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = decode_args(
            envelope.request_codec,
            envelope.args,
            envelope.kwargs,
            envelope.buffers,
            envelope.args_buffer_count,
        )
        if envelope.method == ASGI_METHOD:  # a proxied HTTP request: the router sees its scope
            args = unpack_asgi_args(args)
        return tuple(args), kwargs

    return PendingRequest(
        metadata=RequestMetadata(
            request_id=request.request_id,
            internal_request_id=f"{request.request_id}:{request.seq}",
            call_method=request.method,
            app_name=app_name,
            multiplexed_model_id=request.model_id,
            is_streaming=request.stream,
        ),
        load_arguments=load,
    )
