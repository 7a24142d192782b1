"""Custom metrics from deployment code: Ray Serve's ``ray.serve.metrics``.

Counters, gauges and histograms recorded in a replica travel with its load reports and appear
on the controller's Prometheus endpoint beside the built-in metrics, tagged with the replica's
application, deployment and replica on top of the user's own tags.

Example::

    from serve import metrics

    @serve.deployment
    class Model:
        def __init__(self):
            self.hits = metrics.Counter("model_hits", "Requests served.", tag_keys=("kind",))
            self.hits.set_default_tags({"kind": "default"})

        def __call__(self, x):
            self.hits.inc()
            return x
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Counter", "Gauge", "Histogram"]

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_lock = threading.Lock()  # sync user code records from worker threads
_registry: dict[str, _Metric] = {}


class _Metric:
    kind = ""

    def __init__(
        self, name: str, description: str = "", tag_keys: Iterable[str] | None = None
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"Metric name {name!r} must be a non-empty Prometheus name "
                "(letters, digits, '_' and ':', not starting with a digit)."
            )
        keys = tuple(tag_keys or ())
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"tag_keys must be strings, got {keys!r}.")
        if isinstance(tag_keys, str):
            raise TypeError("tag_keys must be a tuple of strings, not one string.")
        self.name = name
        self.description = description
        self.tag_keys = keys
        self._default_tags: dict[str, str] = {}
        with _lock:
            existing = _registry.get(name)
            if existing is not None and existing.kind != self.kind:
                raise ValueError(f"A {existing.kind} named {name!r} already exists.")
            _registry[name] = self

    def set_default_tags(self, default_tags: Mapping[str, str]) -> None:
        """Tags used when a recording does not give them."""
        self._check_keys(default_tags)
        self._default_tags = dict(default_tags)

    def _check_keys(self, tags: Mapping[str, str]) -> None:
        unknown = sorted(set(tags) - set(self.tag_keys))
        if unknown:
            raise ValueError(
                f"Metric {self.name!r} got unknown tag key(s) {unknown}; its tag_keys are "
                f"{list(self.tag_keys)}."
            )

    def _tags(self, tags: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
        merged = {**self._default_tags, **(tags or {})}
        self._check_keys(merged)
        missing = [k for k in self.tag_keys if k not in merged]
        if missing:
            raise ValueError(
                f"Missing value for tag key(s) {missing} of metric {self.name!r}; pass them in "
                "tags=... or set_default_tags()."
            )
        return tuple((k, str(merged[k])) for k in self.tag_keys)


class _Scalar(_Metric):
    """A metric with one number per set of tag values."""

    def __init__(
        self, name: str, description: str = "", tag_keys: Iterable[str] | None = None
    ) -> None:
        super().__init__(name, description, tag_keys)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}


class Counter(_Scalar):
    """A value that only goes up (Ray's ``metrics.Counter``)."""

    kind = "counter"

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value < 0:
            raise ValueError(f"Counter {self.name!r} can only go up; got inc({value}).")
        key = self._tags(tags)
        with _lock:
            self._values[key] = self._values.get(key, 0.0) + value


class Gauge(_Scalar):
    """A value that is set (Ray's ``metrics.Gauge``)."""

    kind = "gauge"

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        key = self._tags(tags)
        with _lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observed values counted into buckets (Ray's ``metrics.Histogram``)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Iterable[float] | None = None,
        tag_keys: Iterable[str] | None = None,
    ) -> None:
        bounds = [float(b) for b in (boundaries or ())]
        if not bounds or any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
            raise ValueError(
                f"Histogram {name!r} needs boundaries: a list of increasing positive numbers."
            )
        super().__init__(name, description, tag_keys)
        self.boundaries = tuple(bounds)
        self._values: dict[tuple[tuple[str, str], ...], tuple[list[int], float, int]] = {}

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        key = self._tags(tags)
        with _lock:
            buckets, total, count = self._values.get(
                key, ([0] * (len(self.boundaries) + 1), 0.0, 0)
            )
            buckets[bisect.bisect_left(self.boundaries, value)] += 1
            self._values[key] = (buckets, total + value, count + 1)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One metric series as reported to the controller (cumulative where it counts)."""

    name: str
    kind: str
    description: str
    tags: tuple[tuple[str, str], ...]
    value: float = 0.0
    boundaries: tuple[float, ...] = ()
    buckets: tuple[int, ...] = ()  # cumulative, +Inf last
    sum: float = 0.0
    count: int = 0


def snapshot() -> list[Sample]:
    """Every series recorded in this process so far."""
    out: list[Sample] = []
    with _lock:
        metrics = list(_registry.values())
        for metric in metrics:
            values: Any = getattr(metric, "_values", {})
            for tags, value in values.items():
                if isinstance(metric, Histogram):
                    buckets, total, count = value
                    running, cumulative = 0, []
                    for n in buckets:
                        running += n
                        cumulative.append(running)
                    out.append(
                        Sample(
                            metric.name,
                            metric.kind,
                            metric.description,
                            tags,
                            boundaries=metric.boundaries,
                            buckets=tuple(cumulative),
                            sum=total,
                            count=count,
                        )
                    )
                else:
                    out.append(Sample(metric.name, metric.kind, metric.description, tags, value))
    return out
