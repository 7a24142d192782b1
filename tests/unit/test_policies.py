"""Custom autoscaling policies in the controller, driven by load reports alone."""

from __future__ import annotations

from typing import Any

import pytest

from controller.events import LoadReported
from controller.load import LoadBook, autoscale_all
from controller.state import AppGoal, DeploymentGoal
from serve._models import CodeEnv, DeploymentConfig, DeploymentID, DeploymentSpec
from serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy
from tests.support import seen

APP = "app"
A, B = DeploymentID("A", APP), DeploymentID("B", APP)
SEEN = seen.CONTEXTS


def wants_five(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    seen.CONTEXTS.append(ctx)
    return 5, {"reason": "five", "calls": ctx.policy_state.get("calls", 0) + 1}


def by_metric(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    seen.CONTEXTS.append(ctx)
    per_replica = ctx.aggregated_metrics.get("queue", {})
    return (max(per_replica.values()) if per_replica else 1), {}


def broken(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    raise RuntimeError("policy bug")


class Scaled:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, contexts: dict[Any, AutoscalingContext]) -> Any:
        return {d: self.factor * (2 if d.name == "B" else 1) for d in contexts}, {
            d: {"reason": f"x{self.factor}"} for d in contexts
        }


def goal(deployment_id: DeploymentID, policy: Any = None, **auto: Any) -> DeploymentGoal:
    fields: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 8,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "look_back_period_s": 10,
        **({"policy": policy} if policy is not None else {}),
        **auto,
    }
    config = AutoscalingConfig(**fields)
    spec = DeploymentSpec(
        deployment_id.name, b"", b"", "v1", DeploymentConfig(None, autoscaling_config=config)
    )
    return DeploymentGoal(deployment_id, spec, 2)


def app(*goals: DeploymentGoal, policy: AutoscalingPolicy | None = None) -> AppGoal:
    return AppGoal(
        APP,
        goals[0].deployment_id.name,
        None,
        CodeEnv("/", ()),
        {g.deployment_id.name: g for g in goals},
        0.0,
        autoscaling_policy=policy,
    )


def test_a_deployment_policy_decides_and_its_state_comes_back() -> None:
    SEEN.clear()
    g = goal(A, {"policy_function": wants_five})
    book = LoadBook(wall_clock=lambda: 1000.0)
    autoscale_all(book, [app(g)], {A: ["app#A#r1", "app#A#r2"]}, now_s=1.0)
    assert g.target_replicas == 5
    (decision,) = g.scaling_decisions
    assert (decision.prev_num_replicas, decision.curr_num_replicas) == (2, 5)
    assert decision.policy.endswith(":wants_five")
    assert "five" in decision.reason
    assert decision.at_s == g.last_scale_up_s == 1000.0
    autoscale_all(book, [app(g)], {A: ["app#A#r1", "app#A#r2"]}, now_s=2.0)
    assert SEEN[-1].policy_state["calls"] == 1  # what it returned last time
    ctx = SEEN[0]
    assert (ctx.deployment_name, ctx.app_name, ctx.current_num_replicas) == ("A", APP, 2)
    assert [r.unique_id for r in ctx.running_replicas] == ["r1", "r2"]
    assert ctx.total_num_requests == 2 * 2.0  # no reports yet: each replica counts at target


def test_custom_metrics_reach_the_policy_aggregated_and_raw() -> None:
    SEEN.clear()
    g = goal(A, {"policy_function": by_metric}, aggregation_function="max")
    book = LoadBook(wall_clock=lambda: 50.0)
    for now_s, value in ((0.0, 2.0), (0.5, 6.0)):
        book.report(
            LoadReported(A, "app#A#r1", 1.0, False, autoscaling_stats=(("queue", value),)),
            10.0,
            now_s,
        )
    autoscale_all(book, [app(g)], {A: ["app#A#r1"]}, now_s=1.0)
    ctx = SEEN[-1]
    (replica,) = ctx.aggregated_metrics["queue"]
    assert ctx.aggregated_metrics["queue"][replica] == 6.0  # max over the look-back window
    assert [s.value for s in ctx.raw_metrics["queue"][replica]] == [2.0, 6.0]
    assert g.target_replicas == 6


def test_factors_delays_and_bounds_apply_to_what_a_policy_returns() -> None:
    g = goal(A, {"policy_function": wants_five}, upscale_delay_s=5, max_replicas=4)
    book = LoadBook()
    routable = {A: ["app#A#r1", "app#A#r2"]}
    autoscale_all(book, [app(g)], routable, now_s=0.0)
    assert g.target_replicas == 2  # wanted, but not for upscale_delay_s yet
    autoscale_all(book, [app(g)], routable, now_s=6.0)
    assert g.target_replicas == 4  # five, within max_replicas


def test_a_policy_that_raises_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    g = goal(A, {"policy_function": broken})
    autoscale_all(LoadBook(), [app(g)], {A: ["app#A#r1"]}, now_s=0.0)
    assert g.target_replicas == 2
    assert "policy bug" in caplog.text


def test_an_application_policy_decides_for_its_deployments_together() -> None:
    a, b = goal(A), goal(B)
    policy = AutoscalingPolicy(policy_function=Scaled, policy_kwargs={"factor": 3})
    autoscale_all(LoadBook(), [app(a, b, policy=policy)], {A: ["app#A#1"], B: ["app#B#1"]}, 0.0)
    assert (a.target_replicas, b.target_replicas) == (3, 6)
    assert b.scaling_decisions[0].reason.endswith("(x3)")


def test_an_application_policy_returning_unknown_deployments_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def stray(contexts: Any) -> Any:
        return {DeploymentID("Nope", APP): 3}, {}

    a = goal(A)
    autoscale_all(LoadBook(), [app(a, policy=AutoscalingPolicy(stray))], {A: ["app#A#1"]}, 0.0)
    assert a.target_replicas == 2
    assert "not autoscaled deployments of this application" in caplog.text
