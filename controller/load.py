"""Load reports from replicas and handles, and the autoscaling decisions built on them.

Each source (a replica, or one process's handles) keeps a window of what it reported; the
deployment's load is the sum of their averages (``autoscale.total_load``) and
``autoscale.ScaleDecider`` turns it into a replica count after the configured delays. A custom
policy (a deployment's ``autoscaling_config.policy``, or its application's
``autoscaling_policy``) decides instead, through ``controller.policies``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol

from controller import policies
from controller.autoscale import LoadSource, ScaleDecider, total_load
from controller.events import LoadReported
from controller.state import AppGoal, DeploymentGoal, ScalingRecord
from serve._models import DeploymentID
from serve.config import AutoscalingPolicy

logger = logging.getLogger(__name__)

DEFAULT_LOOK_BACK_S = 30.0
DEFAULT_POLICY = "default"


@dataclasses.dataclass(frozen=True)
class Decision:
    """A new target replica count, who decided it and why."""

    target: int
    policy: str
    reason: str
    at_s: float  # wall clock


class Autoscaler(Protocol):
    """What the state machine asks about load; it never hands over its records' owner."""

    def report(self, event: LoadReported, look_back_s: float, now_s: float) -> None: ...

    def prune(
        self, look_back_s: dict[DeploymentID, float], replica_ids: Collection[str], now_s: float
    ) -> None: ...

    def decide(
        self, goal: DeploymentGoal, routable_ids: Collection[str], now_s: float
    ) -> Decision | None: ...

    def decide_app(
        self, app: AppGoal, routable: Mapping[DeploymentID, Collection[str]], now_s: float
    ) -> dict[DeploymentID, Decision]: ...


class LoadBook:
    """What each replica (running) and each process's handles (queued) last reported."""

    def __init__(self, wall_clock: Callable[[], float] = policies.wall_clock) -> None:
        # deployment -> source (a replica, or one process's handles) -> what it reported
        self.sources: dict[DeploymentID, dict[str, LoadSource]] = {}
        self._deciders: dict[DeploymentID, ScaleDecider] = {}
        # deployment or application -> (the policy deployed, its loaded form; None: failed)
        self._policies: dict[
            DeploymentID | str, tuple[AutoscalingPolicy, policies.Running | None]
        ] = {}
        self._wall = wall_clock

    def report(self, event: LoadReported, look_back_s: float, now_s: float) -> None:
        sources = self.sources.setdefault(event.deployment_id, {})
        source = sources.get(event.source_id)
        if source is None:
            source = sources[event.source_id] = LoadSource(is_handle=event.is_handle)
        source.window.add(now_s, event.ongoing, look_back_s)
        source.ongoing = event.ongoing
        source.requests_total = event.requests_total
        source.errors_total = event.errors_total
        source.latency_buckets = event.latency_buckets
        source.latency_sum_ms = event.latency_sum_ms
        source.user_metrics = event.user_metrics
        source.seen_s = now_s
        if event.autoscaling_stats:
            source.add_stats(now_s, self._wall(), dict(event.autoscaling_stats), look_back_s)

    def prune(
        self, look_back_s: dict[DeploymentID, float], replica_ids: Collection[str], now_s: float
    ) -> None:
        """Forget deployments and replicas that are gone, and handles that stopped reporting.

        ``look_back_s`` has one entry per deployment that still exists.
        """
        for deployment_id, sources in list(self.sources.items()):
            if deployment_id not in look_back_s:
                del self.sources[deployment_id]
                continue
            expire_s = max(3 * look_back_s[deployment_id], 60.0)
            for source_id, source in list(sources.items()):
                gone = not source.is_handle and source_id not in replica_ids
                if gone or now_s - source.seen_s > expire_s:
                    del sources[source_id]
        for key in list(self._policies):
            if isinstance(key, DeploymentID) and key not in look_back_s:
                del self._policies[key]

    def decide(
        self, goal: DeploymentGoal, routable_ids: Collection[str], now_s: float
    ) -> Decision | None:
        """A new target for the goal's deployment (its own policy), or None to keep it."""
        config = goal.spec.config.autoscaling_config
        assert config is not None
        deployment_id = goal.deployment_id
        decider = self._deciders.setdefault(deployment_id, ScaleDecider())
        if config.policy.is_default_policy_function():
            sources = self.sources.get(deployment_id, {})
            load = total_load(
                (s.window for s in sources.values()), now_s, config.look_back_period_s
            )
            # A running replica that has not reported yet is assumed at target: missing data
            # must never read as idleness (and trigger a downscale).
            load += config.target_ongoing_requests * sum(
                1 for r in routable_ids if r not in sources
            )
            target = decider.decide(config, goal.target_replicas, load, now_s)
            if target is None or target == goal.target_replicas:
                return None
            return Decision(
                target,
                DEFAULT_POLICY,
                f"{load:.1f} ongoing requests for target_ongoing_requests="
                f"{config.target_ongoing_requests:g}",
                self._wall(),
            )
        running = self._running(deployment_id, config.policy, str(deployment_id))
        if running is None:
            return None
        ctx = policies.context(self._view(goal, routable_ids), now_s, self._wall(), running.state)
        try:
            wanted, running.state = policies.call_deployment_policy(running, ctx)
            target = policies.settle(ctx, wanted, decider, now_s)
        except Exception as exc:
            running.failed(str(deployment_id), exc, now_s)
            return None
        if target is None:
            return None
        reason = _reason(wanted, running.state)
        return Decision(target, str(config.policy.policy_function), reason, self._wall())

    def decide_app(
        self, app: AppGoal, routable: Mapping[DeploymentID, Collection[str]], now_s: float
    ) -> dict[DeploymentID, Decision]:
        """New targets from the application's policy, for all its autoscaled deployments."""
        policy = app.autoscaling_policy
        assert policy is not None
        running = self._running(app.name, policy, f"application {app.name!r}")
        if running is None:
            return {}
        goals = {
            g.deployment_id: g
            for g in app.deployments.values()
            if g.spec.config.autoscaling_config is not None and not g.failed
        }
        wall_s = self._wall()
        contexts = {
            d: policies.context(
                self._view(g, routable.get(d, ())), now_s, wall_s, running.state.get(d, {})
            )
            for d, g in goals.items()
        }
        out: dict[DeploymentID, Decision] = {}
        try:
            wanted, states = policies.call_app_policy(running, contexts)
            running.state = {**running.state, **states}
            for deployment_id, count in wanted.items():
                decider = self._deciders.setdefault(deployment_id, ScaleDecider())
                target = policies.settle(contexts[deployment_id], count, decider, now_s)
                if target is not None:
                    reason = _reason(count, running.state.get(deployment_id, {}))
                    out[deployment_id] = Decision(
                        target, str(policy.policy_function), reason, wall_s
                    )
        except Exception as exc:
            running.failed(f"application {app.name!r}", exc, now_s)
            return {}
        return out

    def _running(
        self, key: DeploymentID | str, policy: AutoscalingPolicy, scope: str
    ) -> policies.Running | None:
        """The loaded policy for ``key``, (re)loaded when the deployed policy changed."""
        entry = self._policies.get(key)
        if entry is None or entry[0] != policy:
            entry = self._policies[key] = (policy, policies.start(policy, scope))
        return entry[1]

    def _view(self, goal: DeploymentGoal, routable_ids: Collection[str]) -> policies.Deployment:
        config = goal.spec.config.autoscaling_config
        assert config is not None
        return policies.Deployment(
            deployment_id=goal.deployment_id,
            config=config,
            target=goal.target_replicas,
            routable_ids=routable_ids,
            sources=self.sources.get(goal.deployment_id, {}),
            last_scale_up_s=goal.last_scale_up_s,
            last_scale_down_s=goal.last_scale_down_s,
        )


def _reason(wanted: object, state: Mapping[str, object]) -> str:
    reason = state.get("reason") if isinstance(state, Mapping) else None
    text = f"the policy asked for {wanted!r}" + (f" ({reason})" if reason else "")
    return text[:300]


def look_back_s(goal: DeploymentGoal | None) -> float:
    auto = goal.spec.config.autoscaling_config if goal is not None else None
    return auto.look_back_period_s if auto is not None else DEFAULT_LOOK_BACK_S


def autoscale_all(
    autoscaler: Autoscaler,
    apps: Iterable[AppGoal],
    routable: Mapping[DeploymentID, Collection[str]],
    now_s: float,
) -> None:
    """Move every autoscaled deployment's target where its policy says, if it says so now:
    an application with an ``autoscaling_policy`` decides for all its autoscaled deployments
    together (Ray: it takes precedence over deployment-level policies)."""
    for app in apps:
        if app.deleting:
            continue
        autoscaled = [
            g
            for g in app.deployments.values()
            if g.spec.config.autoscaling_config is not None and not g.failed
        ]
        if not autoscaled:
            continue
        if app.autoscaling_policy is not None:
            for deployment_id, decision in autoscaler.decide_app(app, routable, now_s).items():
                _apply(app.deployments[deployment_id.name], decision)
            continue
        for goal in autoscaled:
            own = autoscaler.decide(goal, routable.get(goal.deployment_id, ()), now_s)
            if own is not None:
                _apply(goal, own)


MAX_DECISIONS_KEPT = 10


def _apply(goal: DeploymentGoal, decision: Decision) -> None:
    previous = goal.target_replicas
    target = goal.whole_gangs(decision.target)
    if target != decision.target:
        decision = dataclasses.replace(
            decision,
            target=target,
            reason=f"{decision.reason}; {decision.target} rounded up to whole gangs of "
            f"{goal.gang_size}",
        )
    if decision.target == previous:
        return
    logger.info(
        "Autoscaling %s from %d to %d replicas (policy %s): %s",
        goal.deployment_id,
        previous,
        decision.target,
        decision.policy,
        decision.reason,
    )
    goal.scaling = 1 if decision.target > previous else -1
    goal.target_replicas = decision.target
    if goal.scaling > 0:
        goal.last_scale_up_s = decision.at_s
    else:
        goal.last_scale_down_s = decision.at_s
    goal.scaling_decisions = (
        ScalingRecord(decision.at_s, previous, decision.target, decision.policy, decision.reason),
        *goal.scaling_decisions,
    )[:MAX_DECISIONS_KEPT]
