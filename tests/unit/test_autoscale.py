"""The autoscaling decision, as pure functions."""

import pytest

from controller.autoscale import LoadWindow, ScaleDecider, desired_replicas, total_load
from serve._models import DeploymentConfig
from serve._rpc import convert
from serve.config import AutoscalingConfig


def config(**kw: object) -> AutoscalingConfig:
    base: dict[str, object] = {
        "min_replicas": 1,
        "max_replicas": 10,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 3,
        "downscale_delay_s": 10,
    }
    base.update(kw)
    return AutoscalingConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("load", "current", "expected"),
    [(0, 3, 1), (1, 1, 1), (4, 1, 2), (5, 1, 3), (50, 1, 10), (19.5, 5, 10)],
)
def test_desired_is_load_over_target_clamped(load: float, current: int, expected: int) -> None:
    assert desired_replicas(config(), current, load) == expected


def test_fifty_blocked_requests_with_target_ten_is_five_replicas() -> None:
    assert desired_replicas(config(target_ongoing_requests=10), 1, 50) == 5


def test_factors_damp_the_move() -> None:
    assert desired_replicas(config(upscaling_factor=0.5), 2, 20) == 6  # 2 + ceil(0.5 * 8)
    assert desired_replicas(config(downscaling_factor=0.5), 8, 2) == 5  # 8 - floor(0.5 * 7)


def test_the_smoothing_factors_ray_deprecated_still_damp_the_move() -> None:
    assert desired_replicas(config(smoothing_factor=0.5), 2, 20) == 6
    assert desired_replicas(config(upscale_smoothing_factor=0.5), 2, 20) == 6
    assert desired_replicas(config(downscale_smoothing_factor=0.5), 8, 2) == 5
    both = config(smoothing_factor=0.5, upscaling_factor=0.25)  # the newer name wins
    assert desired_replicas(both, 2, 20) == 4  # 2 + ceil(0.25 * 8)


def test_the_smoothing_factors_reach_the_controller() -> None:
    auto = AutoscalingConfig(
        max_replicas=4,
        smoothing_factor=0.5,
        upscale_smoothing_factor=0.7,
        downscale_smoothing_factor=0.3,
    )
    wire = convert.config_to_proto(DeploymentConfig(num_replicas=None, autoscaling_config=auto))
    assert convert.config_from_proto(wire).autoscaling_config == auto


def test_scale_to_zero_and_never_zero_with_load() -> None:
    zero = config(min_replicas=0)
    assert desired_replicas(zero, 2, 0) == 0
    assert desired_replicas(zero, 0, 0.1) == 1


def test_delays_then_apply() -> None:
    decider = ScaleDecider()
    c = config()
    assert decider.decide(c, 1, 10, now_s=0) is None
    assert decider.decide(c, 1, 10, now_s=2.9) is None
    assert decider.decide(c, 1, 10, now_s=3.0) == 5
    assert decider.decide(c, 5, 0, now_s=4) is None
    assert decider.decide(c, 5, 0, now_s=13.9) is None
    assert decider.decide(c, 5, 0, now_s=14.1) == 1


def test_a_change_of_direction_restarts_the_delay() -> None:
    decider = ScaleDecider()
    c = config()
    assert decider.decide(c, 3, 20, now_s=0) is None
    assert decider.decide(c, 3, 0, now_s=2) is None  # now wants down: new clock
    assert decider.decide(c, 3, 20, now_s=4) is None  # up again: new clock
    assert decider.decide(c, 3, 20, now_s=7) == 10


def test_scaling_up_from_zero_is_immediate() -> None:
    decider = ScaleDecider()
    assert decider.decide(config(min_replicas=0), 0, 1, now_s=0) == 1


def test_downscale_to_zero_has_its_own_delay() -> None:
    decider = ScaleDecider()
    c = config(min_replicas=0, downscale_to_zero_delay_s=1)
    assert decider.decide(c, 1, 0, now_s=0) is None
    assert decider.decide(c, 1, 0, now_s=1.5) == 0


def test_load_windows_average_each_source_and_forget_old_samples() -> None:
    a, b = LoadWindow(), LoadWindow()
    a.add(0, 2, look_back_s=10)
    a.add(1, 4, look_back_s=10)
    b.add(1, 5, look_back_s=10)
    assert total_load([a, b], now_s=1, look_back_s=10) == 3 + 5
    assert total_load([a, b], now_s=10.5, look_back_s=10) == 4 + 5
    assert total_load([a, b], now_s=30, look_back_s=10) == 0
