"""The Grafana dashboard in docs/ asks only for series that /metrics serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from controller.metrics import HandleMetrics, ReplicaMetrics, Snapshot, render
from serve._metrics import LATENCY_BUCKETS_MS

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def served_series() -> set[str]:
    """Every sample name /metrics renders for a snapshot that has one of everything."""
    buckets = tuple(range(len(LATENCY_BUCKETS_MS) + 1))
    snapshot = Snapshot(
        replicas=[ReplicaMetrics("app", "Model", "app#Model#a", 5, 1, buckets, 12.5, 1.0, True, 0)],
        handles=[HandleMetrics("app", "Model", "driver-1", 2.0, 7)],
        replica_states=[("app", "Model", "RUNNING", 1)],
        replica_starts=[("app", "Model", 1)],
        application_status=[("app", "RUNNING")],
        deployment_status=[("app", "Model", "HEALTHY")],
        loop_duration_s=0.001,
        loops=3,
    )
    return {sample.name for family in render(snapshot) for sample in family.samples}


def test_every_panel_queries_series_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in expressions for m in re.findall(r"\b(?:ray_serve|serve)_[a-z_]+", e)}
    assert used, expressions
    assert used <= served_series(), used - served_series()
    # Every panel uses the dashboard's datasource variable.
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
