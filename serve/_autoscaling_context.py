"""``AutoscalingContext``: what a custom autoscaling policy is told (Ray's fields).

Built by the controller once per decision. ``total_num_requests``, ``total_queued_requests``,
``aggregated_metrics`` and ``raw_metrics`` may be given as callables: they are computed only
when the policy reads them, then cached, as in Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cached_property
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class TimeStampedValue:
    """One sample of a metric: ``timestamp`` (seconds since the epoch) and ``value``."""

    timestamp: float
    value: float


TimeSeries = list[TimeStampedValue]


def _lazy(value: Any) -> Any:
    return value() if callable(value) else value


class AutoscalingContext:
    """What a custom autoscaling policy sees of one deployment.

    Example::

        def policy(ctx: AutoscalingContext) -> tuple[int, dict]:
            per_replica = ctx.total_num_requests / max(ctx.current_num_replicas, 1)
            wanted = ctx.current_num_replicas + (1 if per_replica > 4 else 0)
            return min(wanted, ctx.capacity_adjusted_max_replicas), {}
    """

    def __init__(
        self,
        deployment_id: Any,
        deployment_name: str,
        app_name: str | None,
        current_num_replicas: int,
        target_num_replicas: int,
        running_replicas: list[Any],
        total_num_requests: float | Callable[[], float],
        total_queued_requests: float | Callable[[], float] | None,
        aggregated_metrics: Any,
        raw_metrics: Any,
        capacity_adjusted_min_replicas: int,
        capacity_adjusted_max_replicas: int,
        policy_state: dict[str, Any],
        last_scale_up_time: float | None,
        last_scale_down_time: float | None,
        current_time: float | None,
        config: Any | None,
        total_pending_async_requests: int = 0,
    ) -> None:
        self.deployment_id = deployment_id
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.current_num_replicas = current_num_replicas
        self.target_num_replicas = target_num_replicas
        self.running_replicas = running_replicas
        self._total_num_requests = total_num_requests
        self._total_queued_requests = total_queued_requests
        self._aggregated_metrics = aggregated_metrics
        self._raw_metrics = raw_metrics
        self.capacity_adjusted_min_replicas = capacity_adjusted_min_replicas
        self.capacity_adjusted_max_replicas = capacity_adjusted_max_replicas
        self.policy_state = policy_state
        self.last_scale_up_time = last_scale_up_time
        self.last_scale_down_time = last_scale_down_time
        self.current_time = current_time
        self.config = config
        self.total_pending_async_requests = total_pending_async_requests

    @cached_property
    def total_num_requests(self) -> float:
        """Requests running in replicas plus queued in handles, averaged over the look-back."""
        return float(_lazy(self._total_num_requests) or 0.0)

    @cached_property
    def total_queued_requests(self) -> float:
        return float(_lazy(self._total_queued_requests) or 0.0)

    @property
    def total_running_requests(self) -> float:
        return self.total_num_requests - self.total_queued_requests

    @cached_property
    def aggregated_metrics(self) -> dict[str, dict[Any, float]]:
        """Custom metric name -> replica id -> its value over the look-back window, aggregated
        by the config's ``aggregation_function`` (``record_autoscaling_stats()`` reports)."""
        return _lazy(self._aggregated_metrics) or {}

    @cached_property
    def raw_metrics(self) -> dict[str, dict[Any, TimeSeries]]:
        """Custom metric name -> replica id -> its samples within the look-back window."""
        return _lazy(self._raw_metrics) or {}

    def __repr__(self) -> str:
        return (
            f"AutoscalingContext(deployment={self.app_name}.{self.deployment_name}, "
            f"current={self.current_num_replicas}, target={self.target_num_replicas})"
        )
