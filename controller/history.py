"""The last 15 minutes of each deployment, for the dashboard's charts: requests/s, errors/s,
p50/p99 latency and running replicas, from the load reports the controller already receives.

Pure: the dashboard's sampler hands :meth:`History.sample` what the load book holds now (each
replica's cumulative counters and when it last reported) and the clocks. A replica's rates are
its counters' growth over its reports of the last two intervals (at least), divided by the time
between them: a sample that sees no new report keeps the last rates, a slow sampler loses
nothing, and reports that arrive late or early do not make spikes. A replica's first report
counts from one report interval before it (replicas report from their start).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from controller.autoscale import LoadSource
from serve._metrics import LATENCY_BUCKETS_MS
from serve._models import DeploymentID

WINDOW_S = 15 * 60.0
STALE_REPORTS = 3  # a replica silent for this many report intervals adds nothing


@dataclasses.dataclass(frozen=True)
class Point:
    """One deployment at one moment (``at_s``: wall clock)."""

    at_s: float
    requests_per_s: float
    errors_per_s: float
    p50_ms: float | None  # None: no request finished in the interval
    p99_ms: float | None
    replicas: int


@dataclasses.dataclass(frozen=True)
class _Report:
    seen_s: float
    requests: int
    errors: int
    buckets: tuple[int, ...]


@dataclasses.dataclass
class _Replica:
    """A replica's recent reports and the rates they imply."""

    reports: deque[_Report]
    requests_per_s: float = 0.0
    errors_per_s: float = 0.0
    bucket_rates: tuple[float, ...] = ()  # cumulative per-bucket counts per second

    @property
    def seen_s(self) -> float:
        return self.reports[-1].seen_s


def quantile_ms(q: float, cumulative: Sequence[float]) -> float | None:
    """The ``q`` quantile of a Prometheus-style cumulative histogram (the last count is the
    total, +Inf), interpolated within its bucket as ``histogram_quantile`` does."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower_bound, lower_count = 0.0, 0.0
    for index, count in enumerate(cumulative):
        if count >= rank:
            if index >= len(LATENCY_BUCKETS_MS):
                return LATENCY_BUCKETS_MS[-1]  # beyond the last bound: say the bound
            upper = LATENCY_BUCKETS_MS[index]
            in_bucket = count - lower_count
            if in_bucket <= 0:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / in_bucket
        lower_count = count
        if index < len(LATENCY_BUCKETS_MS):
            lower_bound = LATENCY_BUCKETS_MS[index]
    return LATENCY_BUCKETS_MS[-1]


class History:
    """Per deployment, a point every sample, for the last ``window_s``."""

    def __init__(
        self, report_interval_s: float, window_s: float = WINDOW_S, rate_span_s: float = 0.0
    ) -> None:
        self._interval_s = report_interval_s
        self.window_s = window_s
        # Rates are taken over reports at least this far apart (when there are such).
        self._rate_span_s = max(rate_span_s, 2 * report_interval_s)
        self._replicas: dict[tuple[DeploymentID, str], _Replica] = {}
        self.points: dict[DeploymentID, deque[Point]] = {}

    def sample(
        self,
        now_s: float,
        wall_s: float,
        sources: Mapping[DeploymentID, Mapping[str, LoadSource]],
        running: Mapping[DeploymentID, int],
    ) -> None:
        """Record one point per deployment in ``running`` (deployment -> running replicas);
        ``sources`` are the load book's reports (``now_s`` and their ``seen_s``: monotonic)."""
        seen: set[tuple[DeploymentID, str]] = set()
        for deployment_id, by_source in sources.items():
            for source_id, source in by_source.items():
                if not source.is_handle:
                    key = (deployment_id, source_id)
                    seen.add(key)
                    self._update(key, source)
        for key in set(self._replicas) - seen:
            del self._replicas[key]
        stale_s = STALE_REPORTS * self._interval_s
        for deployment_id, replicas in running.items():
            live = [
                r
                for (d, _), r in self._replicas.items()
                if d == deployment_id and now_s - r.seen_s <= stale_s
            ]
            points = self.points.setdefault(deployment_id, deque())
            points.append(_point(wall_s, live, replicas))
            while points and wall_s - points[0].at_s > self.window_s:
                points.popleft()
        for deployment_id in set(self.points) - set(running):
            del self.points[deployment_id]

    def _update(self, key: tuple[DeploymentID, str], source: LoadSource) -> None:
        replica = self._replicas.get(key)
        if replica is not None and source.seen_s == replica.seen_s:
            return  # no new report since the last sample: its rates stand
        report = _Report(
            source.seen_s, source.requests_total, source.errors_total, source.latency_buckets
        )
        if replica is None or source.requests_total < replica.reports[-1].requests:
            # Its first report: what it counted since it started, about one interval ago.
            start = _Report(source.seen_s - self._interval_s, 0, 0, (0,) * len(report.buckets))
            replica = self._replicas[key] = _Replica(deque([start]))
        reports = replica.reports
        reports.append(report)
        while len(reports) > 2 and report.seen_s - reports[1].seen_s >= self._rate_span_s:
            reports.popleft()
        base = reports[0]
        dt = report.seen_s - base.seen_s
        if dt <= 0:
            return
        replica.requests_per_s = max(report.requests - base.requests, 0) / dt
        replica.errors_per_s = max(report.errors - base.errors, 0) / dt
        if len(base.buckets) == len(report.buckets):
            replica.bucket_rates = tuple(
                max(now - before, 0) / dt
                for now, before in zip(report.buckets, base.buckets, strict=True)
            )

    def series(self) -> dict[DeploymentID, list[Point]]:
        return {d: list(points) for d, points in self.points.items()}


def _point(wall_s: float, live: Iterable[_Replica], replicas: int) -> Point:
    requests = errors = 0.0
    summed: list[float] = []
    for r in live:
        requests += r.requests_per_s
        errors += r.errors_per_s
        if r.bucket_rates:
            if not summed:
                summed = [0.0] * len(r.bucket_rates)
            if len(summed) == len(r.bucket_rates):
                summed = [a + b for a, b in zip(summed, r.bucket_rates, strict=True)]
    return Point(
        at_s=wall_s,
        requests_per_s=requests,
        errors_per_s=errors,
        p50_ms=quantile_ms(0.5, summed),
        p99_ms=quantile_ms(0.99, summed),
        replicas=replicas,
    )
