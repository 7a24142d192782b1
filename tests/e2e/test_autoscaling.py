"""Autoscaling through real daemons, with short delays."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import serve
from tests.support.apps import Signal
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]

# Short delays; the upscale delay outlasts the look-back window (as Ray's defaults do), so the
# moment requests move from handle queues to new replicas (counted twice within one window)
# cannot trigger an extra replica.
FAST = {
    "upscale_delay_s": 0.6,
    "downscale_delay_s": 1.0,
    "metrics_interval_s": 0.1,
    "look_back_period_s": 0.4,
}


@serve.deployment(max_ongoing_requests=10)
class Held:
    def __init__(self, signal: Any) -> None:
        self._signal = signal

    async def __call__(self) -> str:
        await self._signal.wait.remote()
        return "done"


def _replicas(app: str, deployment: str) -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {s.value: n for s, n in status.deployments[deployment].replica_states.items()}


def _running(app: str, deployment: str) -> int:
    return _replicas(app, deployment).get("RUNNING", 0)


def test_scales_up_under_load_to_exactly_load_over_target_then_down_when_idle() -> None:
    serve.run(Signal.bind(), name="auto-gate", route_prefix=None)
    gate = serve.get_app_handle("auto-gate")
    config = {"min_replicas": 1, "max_replicas": 10, "target_ongoing_requests": 10, **FAST}
    h = serve.run(Held.options(autoscaling_config=config).bind(gate), name="auto")
    assert _running("auto", "Held") == 1
    responses = [h.remote() for _ in range(50)]
    wait_for(lambda: _running("auto", "Held") == 5, timeout_s=30)
    wait_for(lambda: gate.num_waiters.remote().result() == 50, timeout_s=30)
    assert _running("auto", "Held") == 5  # 50 ongoing / 10 per replica: exactly 5
    gate.send.remote().result()
    assert [r.result(timeout_s=30) for r in responses] == ["done"] * 50
    wait_for(lambda: _replicas("auto", "Held") == {"RUNNING": 1}, timeout_s=30)


@serve.deployment(max_ongoing_requests=5)
class Idle:
    async def __call__(self) -> str:
        await asyncio.sleep(0.05)
        return "ok"


def test_scale_to_zero_queues_the_first_request_until_a_replica_is_up() -> None:
    config = {"min_replicas": 0, "max_replicas": 2, "initial_replicas": 0, **FAST}
    h = serve.run(Idle.options(autoscaling_config=config).bind(), name="zero")
    assert _replicas("zero", "Idle") == {}
    assert h.remote().result(timeout_s=30) == "ok"  # waited for a replica, did not fail
    assert _running("zero", "Idle") >= 1
    wait_for(lambda: _replicas("zero", "Idle") == {}, timeout_s=30)
    assert h.remote().result(timeout_s=30) == "ok"


def test_num_replicas_auto_starts_one_replica_and_reports_status() -> None:
    serve.run(Idle.options(num_replicas="auto").bind(), name="auto-default")
    status = serve.status().applications["auto-default"]
    assert status.status == "RUNNING"
    assert status.deployments["Idle"].replica_states == {"RUNNING": 1}
