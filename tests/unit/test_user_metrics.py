"""serve.metrics (Ray's ray.serve.metrics): recording, tags, validation, the reported snapshot."""

from __future__ import annotations

import pytest

from serve import metrics


def _series(name: str) -> list[metrics.Sample]:
    return [s for s in metrics.snapshot() if s.name == name]


def test_counter_with_default_and_given_tags() -> None:
    hits = metrics.Counter("unit_hits", "Hits.", tag_keys=("route",))
    hits.set_default_tags({"route": "/"})
    hits.inc()
    hits.inc(2, tags={"route": "/a"})
    hits.inc(tags={"route": "/a"})
    by_tags = {s.tags: s.value for s in _series("unit_hits")}
    assert by_tags == {(("route", "/"),): 1.0, (("route", "/a"),): 3.0}
    with pytest.raises(ValueError, match="can only go up"):
        hits.inc(-1)


def test_gauge_and_histogram() -> None:
    depth = metrics.Gauge("unit_depth", tag_keys=("q",))
    depth.set(5, tags={"q": "a"})
    depth.set(2, tags={"q": "a"})
    assert [s.value for s in _series("unit_depth")] == [2.0]
    latency = metrics.Histogram("unit_latency_ms", boundaries=[1, 10, 100])
    for value in (0.5, 5, 50, 500):
        latency.observe(value)
    (series,) = _series("unit_latency_ms")
    assert series.buckets == (1, 2, 3, 4)
    assert series.count == 4
    assert series.sum == 555.5


def test_tags_must_match_the_declared_keys() -> None:
    counter = metrics.Counter("unit_tagged", tag_keys=("a", "b"))
    with pytest.raises(ValueError, match=r"Missing value for tag key\(s\) \['b'\]"):
        counter.inc(tags={"a": "1"})
    with pytest.raises(ValueError, match="unknown tag key"):
        counter.inc(tags={"a": "1", "b": "2", "c": "3"})


def test_names_and_boundaries_are_checked() -> None:
    with pytest.raises(ValueError, match="Prometheus name"):
        metrics.Counter("bad name")
    with pytest.raises(ValueError, match="increasing positive"):
        metrics.Histogram("unit_bad_bounds", boundaries=[10, 1])
    metrics.Counter("unit_kind")
    with pytest.raises(ValueError, match="already exists"):
        metrics.Gauge("unit_kind")
