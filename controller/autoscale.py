"""The autoscaling decision, as pure functions and a small state machine. No I/O.

Load is the number of ongoing requests: running in replicas plus queued in handles, each
source averaged over ``look_back_period_s``. Desired replicas = ceil(load / target), moved
towards by ``upscaling_factor`` / ``downscaling_factor`` (or the smoothing factors they
replace, as Ray's), clamped to [min, max]. A change is applied once it has been wanted for
``upscale_delay_s`` (or ``downscale_delay_s``, or ``downscale_to_zero_delay_s`` for zero);
scaling up from zero replicas is immediate.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable

from serve.config import AutoscalingConfig
from serve.metrics import Sample


def desired_replicas(config: AutoscalingConfig, current: int, load: float) -> int:
    """The replica count this load calls for (before any delay)."""
    raw = math.ceil(load / config.target_ongoing_requests) if load > 0 else 0
    if raw > current:
        raw = current + math.ceil(config.get_upscaling_factor() * (raw - current))
    elif raw < current:
        raw = current - math.floor(config.get_downscaling_factor() * (current - raw))
    desired = min(max(raw, config.min_replicas), config.max_replicas)
    if load > 0 and desired == 0:
        desired = 1  # someone is waiting: never stay at zero
    return desired


@dataclasses.dataclass
class ScaleDecider:
    """Applies a changed desired count only after it has been wanted for the delay."""

    direction: int = 0
    since_s: float = 0.0

    def decide(
        self, config: AutoscalingConfig, current: int, load: float, now_s: float
    ) -> int | None:
        """The new replica count to apply now, or None to keep ``current``."""
        return self.gate(config, current, desired_replicas(config, current, load), now_s)

    def gate(
        self, config: AutoscalingConfig, current: int, desired: int, now_s: float
    ) -> int | None:
        """``desired`` once it has been wanted for the delay (at once from zero), else None."""
        if desired == current:
            self.direction = 0
            return None
        if current == 0:
            self.direction = 0
            return desired  # scale from zero at once: requests are waiting
        direction = 1 if desired > current else -1
        if direction != self.direction:
            self.direction, self.since_s = direction, now_s
        if direction > 0:
            delay_s = config.upscale_delay_s
        elif desired == 0 and config.downscale_to_zero_delay_s is not None:
            delay_s = config.downscale_to_zero_delay_s
        else:
            delay_s = config.downscale_delay_s
        if now_s - self.since_s < delay_s:
            return None
        self.direction = 0
        return desired


def apply_scaling_factors(desired: float, running: int, config: AutoscalingConfig) -> int:
    """A custom policy's count moved towards by upscaling_factor / downscaling_factor (Ray's
    rule: the factor scales the change from the running count; from zero it does not)."""
    if running == 0:
        return math.ceil(desired)
    delta = desired - running
    factor = config.get_upscaling_factor() if delta > 0 else config.get_downscaling_factor()
    scaled = math.ceil(running + factor * delta)
    if math.ceil(desired) < running and scaled == running:
        scaled -= 1  # a small factor must not stall a downscale
    return scaled


class LoadWindow:
    """Load samples of one source (a replica or a handle), kept for the look-back period."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now_s: float, value: float, look_back_s: float) -> None:
        self._samples.append((now_s, value))
        self.trim(now_s, look_back_s)

    def trim(self, now_s: float, look_back_s: float) -> None:
        while self._samples and now_s - self._samples[0][0] > look_back_s:
            self._samples.popleft()

    def average(self) -> float | None:
        if not self._samples:
            return None
        return sum(v for _, v in self._samples) / len(self._samples)


def total_load(windows: Iterable[LoadWindow], now_s: float, look_back_s: float) -> float:
    """Sum over sources of each source's average within the look-back period."""
    total = 0.0
    for window in windows:
        window.trim(now_s, look_back_s)
        average = window.average()
        if average is not None:
            total += average
    return total


@dataclasses.dataclass
class LoadSource:
    """What one replica, or one process's handles, last reported for a deployment."""

    is_handle: bool
    window: LoadWindow = dataclasses.field(default_factory=LoadWindow)
    ongoing: float = 0.0
    requests_total: int = 0
    errors_total: int = 0
    latency_buckets: tuple[int, ...] = ()
    latency_sum_ms: float = 0.0
    user_metrics: tuple[Sample, ...] = ()
    seen_s: float = 0.0
    # record_autoscaling_stats() reports: (monotonic, wall clock, metric -> value)
    stats: deque[tuple[float, float, dict[str, float]]] = dataclasses.field(default_factory=deque)

    def add_stats(
        self, now_s: float, wall_s: float, values: dict[str, float], look_back_s: float
    ) -> None:
        self.stats.append((now_s, wall_s, values))
        while self.stats and now_s - self.stats[0][0] > look_back_s:
            self.stats.popleft()
