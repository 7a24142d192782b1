"""Request routers, autoscaling policies and deployments the extension-point tests use.

Routers and policies travel by value to the processes that run them (drivers, replicas, the
proxy; the controller), so this module need not be importable there.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

import serve
from serve.config import AutoscalingContext
from serve.request_router import PendingRequest, RequestRouter, RunningReplica


def session_of(pending: PendingRequest | None) -> str:
    """The request's session: a ``session`` keyword argument, or (a request from the HTTP
    proxy, whose first argument is the ASGI scope) its ``x-session`` header."""
    if pending is None:
        return ""
    if "session" in pending.kwargs:
        return str(pending.kwargs["session"])
    scope = pending.args[0] if pending.args else None
    if isinstance(scope, dict):
        for name, value in scope.get("headers", ()):
            if name == b"x-session":
                return str(value.decode("latin-1"))
    return ""


def _weight(session: str, replica: RunningReplica) -> bytes:
    return hashlib.sha256(f"{session}/{replica.replica_id.unique_id}".encode()).digest()


class StickyRouter(RequestRouter):
    """Session affinity: every request of a session goes to one replica (by rendezvous hash
    the first time); when that replica is gone, the session moves to another and stays."""

    def initialize_state(self, **kwargs: Any) -> None:
        self.pins: dict[Any, Any] = {}
        self.routed = 0

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        session = session_of(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        pinned_id = self.pins.get(session)
        pinned = None if pinned_id is None else by_id.get(pinned_id)
        if pinned is None:
            pinned = max(candidate_replicas, key=lambda r: _weight(session, r))
            self.pins[session] = pinned.replica_id
        return [[pinned]]

    def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
        self.routed += 1


class LowestRankRouter(RequestRouter):
    """Sends everything to the replica reporting the lowest ``rank`` in its routing stats
    (replicas that reported nothing yet come last)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ranked = sorted(candidate_replicas, key=lambda r: r.routing_stats.get("rank", math.inf))
        return [[replica] for replica in ranked]


class FlakyRouter(RequestRouter):
    """Raises for the ``boom`` session, hangs for ``hang``; otherwise any replica."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        session = session_of(pending_request)
        if session == "boom":
            raise ValueError("this router cannot route boom")
        if session == "garbage":
            return "not ranks"  # type: ignore[return-value]
        return [candidate_replicas]


@serve.deployment(
    num_replicas=3,
    request_router_config={"request_router_class": StickyRouter},
)
class Sticky:
    """Answers with its pid, whether called by a handle or over HTTP."""

    def __call__(self, request: Any = None, session: str = "") -> int:
        return os.getpid()


@serve.deployment
class Front:
    """Calls Sticky from inside a replica (its routing runs here)."""

    def __init__(self, sticky: Any) -> None:
        self._sticky = sticky

    async def __call__(self, session: str) -> int:
        pid: int = await self._sticky.remote(session=session)
        return pid


class MetricPolicy:
    """Class-based policy: enough replicas for the largest ``pending_jobs`` a replica reports
    (``record_autoscaling_stats``), ``jobs_per_replica`` each."""

    def __init__(self, jobs_per_replica: int) -> None:
        self._per_replica = jobs_per_replica
        self.calls = 0

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        self.calls += 1
        jobs = ctx.aggregated_metrics.get("pending_jobs", {})
        if not jobs:
            return ctx.target_num_replicas, {"reason": "no metric yet"}
        most = max(jobs.values())
        wanted = max(1, math.ceil(most / self._per_replica))
        return wanted, {"reason": f"{most:g} pending jobs, call {self.calls}"}


@serve.deployment(
    max_ongoing_requests=10,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 4,
        "metrics_interval_s": 0.1,
        "look_back_period_s": 0.5,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "policy": {"policy_function": MetricPolicy, "policy_kwargs": {"jobs_per_replica": 10}},
    },
)
class JobQueue:
    """Reports the number of pending jobs written to a file (by the test)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def __call__(self) -> int:
        return os.getpid()

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"pending_jobs": float(self._path.read_text() or 0)}


class LinkedPolicy:
    """Application-level policy: ``n`` Preprocessor replicas and ``2n`` Model replicas, ``n``
    read from a file (standing in for an external signal)."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def __call__(
        self, contexts: dict[Any, AutoscalingContext]
    ) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        n = int(self._path.read_text())
        decisions, states = {}, {}
        for deployment_id in contexts:
            if deployment_id.name == "Preprocessor":
                decisions[deployment_id] = n
            elif deployment_id.name == "Model":
                decisions[deployment_id] = 2 * n
            states[deployment_id] = {"reason": f"n={n}"}
        return decisions, states


@serve.deployment(num_replicas=3)
class SlowStart:
    """A constructor that takes a while, so rollouts can be watched."""

    def __init__(self, version: str) -> None:
        time.sleep(0.4)
        self._version = version

    def __call__(self) -> tuple[str, int]:
        return self._version, os.getpid()
