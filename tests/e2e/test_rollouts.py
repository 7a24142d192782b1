"""Rollouts bounded as Ray's (rolling_update_percentage, max_surge_percent), watched through
``serve.status()`` while a new version replaces the old one."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import serve
from tests.support.extensions import SlowStart

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


def watch_rollout(app: str, **options: Any) -> list[dict[str, int]]:
    """Deploy v1, then roll out v2 with ``options`` while sampling the replica states."""
    h = serve.run(SlowStart.bind("v1"), name=app, route_prefix=None)
    old = {h.remote().result(timeout_s=30)[1] for _ in range(12)}
    samples: list[dict[str, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = serve.status().applications.get(app)
            if status is not None:
                states = status.deployments["SlowStart"].replica_states
                samples.append({s.value: n for s, n in states.items()})
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        serve.run(
            SlowStart.options(version="v2", **options).bind("v2"), name=app, route_prefix=None
        )
    finally:
        done.set()
        sampler.join(30)
    answers = {h.remote().result(timeout_s=30) for _ in range(12)}
    assert {version for version, _ in answers} == {"v2"}
    assert not old & {pid for _, pid in answers}  # every replica was replaced
    return samples


def live(sample: dict[str, int]) -> int:
    """Replicas running or on their way (not stopping): what a rollout bounds."""
    return sum(count for state, count in sample.items() if state != "STOPPING")


def first_wave(samples: list[dict[str, int]]) -> int:
    """Old replicas the rollout's first step took out of service, from the first sample with
    fewer than three running (a stopping replica may be gone before it is sampled; its
    replacement is then already STARTING)."""
    return next(3 - s.get("RUNNING", 0) for s in samples if s.get("RUNNING", 0) < 3)


def test_a_rollout_without_surge_never_exceeds_the_target() -> None:
    samples = watch_rollout("no-surge", max_surge_percent=0)
    assert any(s.get("STOPPING") for s in samples)  # the rollout was watched while it ran
    assert max(live(s) for s in samples) == 3, samples
    # the first wave is max(int(0.2 * 3), 1) = 1 replica (stopped in one step of the plan)
    assert first_wave(samples) == 1, samples


def test_a_rollout_with_a_surge_starts_replacements_first_within_the_surge() -> None:
    samples = watch_rollout("surge", max_surge_percent=100, rolling_update_percentage=1.0)
    assert max(live(s) for s in samples) > 3, samples  # the watcher does see a surge
    assert max(live(s) for s in samples) <= 6, samples  # 3 + ceil(3 * 100 / 100)
    assert min(s.get("RUNNING", 0) + s.get("UPDATING", 0) for s in samples) >= 3, samples


def test_rolling_update_percentage_sets_the_wave() -> None:
    samples = watch_rollout("waves", rolling_update_percentage=0.7)
    # max(int(0.7 * 3), 1) = 2 old replicas stop at once, and still never more than 3 live
    assert first_wave(samples) == 2, samples
    assert max(live(s) for s in samples) == 3, samples
