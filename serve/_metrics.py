"""Request outcome and latency counting, shared by replicas (who count) and the controller."""

from __future__ import annotations

import bisect
from typing import Final

# Bucket upper bounds of the latency histograms, in milliseconds (a final +Inf is implied).
LATENCY_BUCKETS_MS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
)  # fmt: skip


class RequestStats:
    """Cumulative request, error and latency counts of one replica."""

    __slots__ = ("_buckets", "errors", "requests", "sum_ms")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.sum_ms = 0.0
        self._buckets = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def record(self, duration_ms: float, *, error: bool) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        self.sum_ms += duration_ms
        self._buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, duration_ms)] += 1

    def cumulative_buckets(self) -> list[int]:
        """Counts of requests at or under each bound, then the total (Prometheus style)."""
        out, running = [], 0
        for count in self._buckets:
            running += count
            out.append(running)
        return out
