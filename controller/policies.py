"""Custom autoscaling policies (Ray's ``AutoscalingPolicy``), run by the controller.

A policy is the user's function (or an instance of the user's class, built once with
``policy_kwargs``) taking an ``AutoscalingContext`` per deployment, or, for an application-level
policy, a dict of them keyed by deployment id. What it returns goes through Ray's defaults:
``upscaling_factor`` / ``downscaling_factor``, the up/down delays, an immediate start from zero
when requests wait, then the ``min_replicas`` / ``max_replicas`` bounds. A policy that raises or
returns something unusable is logged and changes nothing.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from controller.autoscale import LoadSource, ScaleDecider, apply_scaling_factors, total_load
from serve._models import DeploymentID, ReplicaID
from serve.config import (
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    TimeStampedValue as Sample,
)

logger = logging.getLogger(__name__)

ERROR_LOG_EVERY_S = 30.0


def load_policy(policy: AutoscalingPolicy) -> Callable[..., Any]:
    """The callable a policy names: a class is instantiated once, with ``policy_kwargs``."""
    target = policy.get_policy()
    if inspect.isclass(target):
        logger.info(
            "Instantiating class-callable autoscaling policy %r with kwargs %s",
            policy.policy_function,
            policy.policy_kwargs,
        )
        instance: Any = target(**policy.policy_kwargs)
        if not callable(instance):
            raise TypeError(f"an instance of policy class {target!r} is not callable")
        return instance  # type: ignore[no-any-return]
    return target


@dataclasses.dataclass
class Running:
    """A loaded policy and what it carries between decisions."""

    policy: AutoscalingPolicy
    call: Callable[..., Any]
    state: dict[Any, Any] = dataclasses.field(default_factory=dict)
    failed_at_s: float = -ERROR_LOG_EVERY_S

    def failed(self, scope: str, exc: BaseException, now_s: float) -> None:
        if now_s - self.failed_at_s >= ERROR_LOG_EVERY_S:
            self.failed_at_s = now_s
            logger.error(
                "Autoscaling policy %r of %s failed: %s; the replica count stays as it is",
                self.policy.policy_function,
                scope,
                exc,
                exc_info=exc,
            )


def start(policy: AutoscalingPolicy, scope: str) -> Running | None:
    """Load ``policy`` (logged); None if it cannot be loaded here."""
    try:
        running = Running(policy, load_policy(policy))
    except Exception as exc:
        logger.error(
            "Cannot load autoscaling policy %r for %s: %s; it is not autoscaled until it is "
            "redeployed with a policy the controller can import",
            policy.policy_function,
            scope,
            exc,
            exc_info=exc,
        )
        return None
    logger.info("Using custom autoscaling policy %r for %s.", policy.policy_function, scope)
    return running


@dataclasses.dataclass
class Deployment:
    """What a context is built from: one autoscaled deployment as the controller sees it."""

    deployment_id: DeploymentID
    config: AutoscalingConfig
    target: int
    routable_ids: Collection[str]
    sources: Mapping[str, LoadSource]
    last_scale_up_s: float | None
    last_scale_down_s: float | None


def context(
    d: Deployment, now_s: float, wall_s: float, state: dict[str, Any]
) -> AutoscalingContext:
    """The ``AutoscalingContext`` of one deployment (metrics computed when first read)."""
    config = d.config
    look_back_s = config.look_back_period_s
    running = [r for r in d.routable_ids]

    def total() -> float:
        load = total_load((s.window for s in d.sources.values()), now_s, look_back_s)
        unreported = sum(1 for r in running if r not in d.sources)
        return load + config.target_ongoing_requests * unreported  # missing data is not idle

    def queued() -> float:
        handles = (s.window for s in d.sources.values() if s.is_handle)
        return total_load(handles, now_s, look_back_s)

    def raw() -> dict[str, dict[ReplicaID, list[Sample]]]:
        series: dict[str, dict[ReplicaID, list[Sample]]] = {}
        for replica_id in running:
            source = d.sources.get(replica_id)
            if source is None:
                continue
            for at_s, wall, values in source.stats:
                if now_s - at_s > look_back_s:
                    continue
                for name, value in values.items():
                    series.setdefault(name, {}).setdefault(ReplicaID.parse(replica_id), []).append(
                        Sample(wall, value)
                    )
        return series

    def aggregated() -> dict[str, dict[ReplicaID, float]]:
        combine: Callable[[list[float]], float] = {
            "max": max,
            "min": min,
        }.get(config.aggregation_function.value, lambda xs: sum(xs) / len(xs))
        return {
            name: {r: combine([s.value for s in samples]) for r, samples in per_replica.items()}
            for name, per_replica in raw().items()
        }

    return AutoscalingContext(
        deployment_id=d.deployment_id,
        deployment_name=d.deployment_id.name,
        app_name=d.deployment_id.app_name,
        current_num_replicas=len(running),
        target_num_replicas=d.target,
        running_replicas=[ReplicaID.parse(r) for r in running],
        total_num_requests=total,
        total_queued_requests=queued,
        aggregated_metrics=aggregated,
        raw_metrics=raw,
        capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas,
        policy_state=dict(state),
        last_scale_up_time=d.last_scale_up_s,
        last_scale_down_time=d.last_scale_down_s,
        current_time=wall_s,
        config=config,
    )


def settle(ctx: AutoscalingContext, wanted: Any, decider: ScaleDecider, now_s: float) -> int | None:
    """A policy's wanted count after Ray's defaults (cold start, factors, delays, bounds);
    None to keep the target. ``TypeError`` if ``wanted`` is not a number."""
    if isinstance(wanted, bool) or not isinstance(wanted, int | float) or math.isnan(wanted):
        raise TypeError(f"the policy must return a number of replicas, got {wanted!r}")
    config = ctx.config
    assert isinstance(config, AutoscalingConfig)
    if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:  # someone waits: at once
        desired = max(math.ceil(config.get_upscaling_factor()), ctx.target_num_replicas, 1)
        decider.direction = 0
    else:
        scaled = apply_scaling_factors(wanted, ctx.current_num_replicas, config)
        gated = decider.gate(config, ctx.target_num_replicas, max(scaled, 0), now_s)
        if gated is None:
            return None
        desired = gated
    bounded = min(max(desired, config.min_replicas), config.max_replicas)
    return bounded if bounded != ctx.target_num_replicas else None


def call_deployment_policy(running: Running, ctx: AutoscalingContext) -> tuple[Any, dict[str, Any]]:
    """(wanted replicas, new policy state) from a deployment-level policy."""
    result = running.call(ctx)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"the policy must return (num_replicas, policy_state), got {result!r}")
    wanted, state = result
    return wanted, dict(state or {})


def call_app_policy(
    running: Running, contexts: dict[DeploymentID, AutoscalingContext]
) -> tuple[dict[DeploymentID, Any], dict[DeploymentID, dict[str, Any]]]:
    """(wanted replicas per deployment, policy state per deployment) from an application
    policy; ``TypeError`` naming the problem if its answer does not fit."""
    result = running.call(contexts)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"the policy must return (decisions, policy_state) dicts, got {result!r}")
    decisions, states = result
    states = states or {}
    if not isinstance(decisions, dict) or not isinstance(states, dict):
        raise TypeError(
            "the policy must return a dict of deployment id -> replicas and a dict of "
            f"deployment id -> state, got {decisions!r} and {states!r}"
        )
    unknown = [d for d in [*decisions, *states] if d not in contexts]
    if unknown:
        raise TypeError(
            f"the policy returned decisions or state for {unknown!r}, which are not autoscaled "
            f"deployments of this application ({sorted(map(str, contexts))})"
        )
    return decisions, {d: dict(s or {}) for d, s in states.items()}


def wall_clock() -> float:
    return time.time()
