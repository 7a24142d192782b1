"""The dashboard's 15-minute history: rates from cumulative load reports, latency quantiles
from histogram buckets, stale and departed replicas, the window."""

from __future__ import annotations

import pytest

from controller.autoscale import LoadSource
from controller.history import History, quantile_ms
from serve._metrics import LATENCY_BUCKETS_MS
from serve._models import DeploymentID

MODEL = DeploymentID("Model", "app")
OTHER = DeploymentID("Other", "app")


def buckets(*latencies_ms: float) -> tuple[int, ...]:
    """Prometheus-style cumulative buckets of these latencies."""
    under = [sum(1 for x in latencies_ms if x <= bound) for bound in LATENCY_BUCKETS_MS]
    return (*under, len(latencies_ms))


def report(seen_s: float, requests: int, errors: int = 0, latency_ms: float = 3.0) -> LoadSource:
    return LoadSource(
        is_handle=False,
        seen_s=seen_s,
        requests_total=requests,
        errors_total=errors,
        latency_buckets=buckets(*([latency_ms] * requests)),
    )


def test_quantiles_interpolate_within_their_bucket() -> None:
    assert quantile_ms(0.5, buckets()) is None
    # 100 requests between 2.5 and 5 ms: the median is halfway through that bucket.
    assert quantile_ms(0.5, buckets(*[4.0] * 100)) == pytest.approx(3.75)
    assert quantile_ms(0.99, buckets(*[0.2] * 99, 40.0)) == pytest.approx(0.25)
    assert quantile_ms(0.999, buckets(*[0.2] * 99, 40.0)) == pytest.approx(
        25.0 + 25.0 * (99.9 - 99) / 1
    )
    beyond = buckets(*[100_000.0] * 3)
    assert quantile_ms(0.5, beyond) == LATENCY_BUCKETS_MS[-1]


def test_rates_add_up_over_replicas_and_survive_samples_without_reports() -> None:
    history = History(report_interval_s=1.0)
    for second in range(1, 6):
        sources = {
            MODEL: {
                "a": report(float(second), 10 * second, errors=second),
                "b": report(float(second), 30 * second),
            }
        }
        history.sample(second + 0.5, 1000.0 + second, sources, {MODEL: 2})
    # One more sample with no new report: the rates stand.
    history.sample(5.9, 1005.9, sources, {MODEL: 2})
    points = history.series()[MODEL]
    assert len(points) == 6
    for point in points:
        assert point.requests_per_s == pytest.approx(40.0)
        assert point.errors_per_s == pytest.approx(1.0)
        assert point.p50_ms == pytest.approx(3.75)  # all took 3 ms: the 2.5-5 ms bucket
        assert point.replicas == 2
    assert points[-1].at_s == 1005.9


def test_late_and_early_reports_do_not_make_spikes() -> None:
    history = History(report_interval_s=1.0, rate_span_s=2.0)
    # Counted every second at 100 requests/s; reports 3 and 4 arrive 0.1 s apart.
    arrivals = [1.0, 2.0, 3.3, 3.4, 5.0, 6.0]
    for sent, seen in enumerate(arrivals, start=1):
        history.sample(seen, seen, {MODEL: {"a": report(seen, 100 * sent)}}, {MODEL: 1})
    rates = [p.requests_per_s for p in history.series()[MODEL]]
    assert all(60.0 <= rate <= 140.0 for rate in rates), rates  # one report apart: 1000/s


def test_silent_and_departed_replicas_stop_counting() -> None:
    history = History(report_interval_s=1.0)
    history.sample(1.0, 1.0, {MODEL: {"a": report(1.0, 10), "b": report(1.0, 10)}}, {MODEL: 2})
    history.sample(2.0, 2.0, {MODEL: {"a": report(2.0, 20), "b": report(2.0, 20)}}, {MODEL: 2})
    assert history.series()[MODEL][-1].requests_per_s == pytest.approx(20.0)
    # "b" stops reporting (hung): three intervals later it adds nothing.
    history.sample(5.5, 5.5, {MODEL: {"a": report(5.5, 55), "b": report(2.0, 20)}}, {MODEL: 2})
    assert history.series()[MODEL][-1].requests_per_s == pytest.approx(10.0)
    # "a" is gone from the load book (replaced): only the new replica counts.
    history.sample(6.0, 6.0, {MODEL: {"c": report(6.0, 5)}}, {MODEL: 1})
    last = history.series()[MODEL][-1]
    assert last.requests_per_s == pytest.approx(5.0)  # its first report: one interval's worth
    assert last.replicas == 1


def test_the_window_keeps_15_minutes_and_forgets_deleted_deployments() -> None:
    history = History(report_interval_s=10.0)
    for i in range(200):
        at = 10.0 * i
        history.sample(at, at, {}, {MODEL: 1, OTHER: 1})
    points = history.series()[MODEL]
    assert points[-1].at_s - points[0].at_s <= 15 * 60
    assert len(points) == 91
    assert points[-1].requests_per_s == 0.0
    assert points[-1].p50_ms is None
    history.sample(2000.0, 2000.0, {}, {MODEL: 1})
    assert set(history.series()) == {MODEL}


def test_handles_are_not_replicas() -> None:
    history = History(report_interval_s=1.0)
    handle = LoadSource(is_handle=True, seen_s=1.0, requests_total=500, ongoing=3.0)
    history.sample(1.0, 1.0, {MODEL: {"driver": handle}}, {MODEL: 0})
    assert history.series()[MODEL][-1].requests_per_s == 0.0
