"""A deploy turned into an application's goal: validated, and carrying over what still holds."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable

from controller.events import AppDeployed
from controller.state import AppGoal, DeploymentGoal, Phase, ReplicaRecord
from serve._models import DeploymentID, Failure, ReplicaID

logger = logging.getLogger(__name__)


def build_app(event: AppDeployed, previous: AppGoal | None) -> AppGoal:
    """The new goal of ``event.app_name``; ``ValueError`` if the deploy is invalid.

    An autoscaled deployment keeps its current target (within the new bounds), and a deployment
    whose code did not change keeps having run (so its failures do not fail the deploy).
    """
    app_name = event.app_name
    names = [s.name for s in event.specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate deployment names in application {app_name!r}: {names}")
    if event.ingress not in names:
        raise ValueError(f"Ingress {event.ingress!r} is not one of the deployments {names}")
    goals: dict[str, DeploymentGoal] = {}
    for spec in event.specs:
        old = previous.deployments.get(spec.name) if previous and not previous.deleting else None
        target = spec.config.initial_replicas()
        if old is not None and spec.config.autoscaling_config is not None:
            auto = spec.config.autoscaling_config
            if old.spec.config.autoscaling_config is not None:
                target = min(max(old.target_replicas, auto.min_replicas), auto.max_replicas)
        goal = DeploymentGoal(DeploymentID(spec.name, app_name), spec, target)
        if old is not None and old.version == spec.code_version:
            goal.ever_running = old.ever_running
        goals[spec.name] = goal
    return AppGoal(
        name=app_name,
        ingress=event.ingress,
        route_prefix=event.route_prefix,
        code_env=event.code_env,
        deployments=goals,
        deployed_at_s=event.deployed_at_s,
        config_json=event.config_json,
        autoscaling_policy=event.autoscaling_policy,
    )


def new_replica_id(deployment_id: DeploymentID) -> str:
    """A fresh replica id (random: unique across controller restarts)."""
    return str(ReplicaID.new(deployment_id))


def new_gang_id() -> str:
    """A fresh gang id (a restarted gang is a new gang)."""
    return secrets.token_hex(4)


def whole_gangs(goal: DeploymentGoal) -> None:
    """A gang deployment's target in whole gangs, whoever set it (its policy's decisions are
    already rounded when applied)."""
    goal.target_replicas = goal.whole_gangs(goal.target_replicas)


def free_rank(records: Iterable[ReplicaRecord], deployment_id: DeploymentID) -> int:
    """The lowest rank no live replica of the deployment holds (Ray's replica rank)."""
    taken = {
        r.rank
        for r in records
        if r.deployment_id == deployment_id and r.phase is not Phase.STOPPING
    }
    rank = 0
    while rank in taken:
        rank += 1
    return rank


BACKOFF_START_S = 1.0  # Ray's replica start backoff: 1 s, doubling ...
BACKOFF_MAX_S = 64.0  # ... up to 64 s
NODE_FAILURES_TO_AVOID = 2  # start failures in a row on one node that make it avoided ...
NODE_AVOID_S = 60.0  # ... for this long


def count_failure(goal: DeploymentGoal, failure: Failure, node: str, now_s: float) -> None:
    """A replica of the goal's code version failed to start (on ``node``, if known).

    Up to the limit, replacements start at once. Past it, the deploy fails if no replica of
    this version ever ran (Ray's DEPLOY_FAILED); otherwise starts back off exponentially (the
    deployment is UNHEALTHY meanwhile), as Ray's do. A node where replicas failed
    NODE_FAILURES_TO_AVOID times in a row is avoided for NODE_AVOID_S, so one bad node cannot
    stall a deploy.
    """
    goal.failures += 1
    goal.last_error = failure
    if node:
        goal.node_failures[node] = goal.node_failures.get(node, 0) + 1
        if goal.node_failures[node] >= NODE_FAILURES_TO_AVOID:
            goal.node_failures[node] = 0
            goal.avoid_until_s[node] = now_s + NODE_AVOID_S
            logger.warning(
                "Replicas of %s failed to start on %s %d times in a row; keeping them off it "
                "for %.0fs where other nodes can take them",
                goal.deployment_id,
                node,
                NODE_FAILURES_TO_AVOID,
                NODE_AVOID_S,
            )
    if goal.failures < goal.failure_limit():
        return
    if not goal.ever_running:
        goal.failed = True
        logger.error(
            "Deployment %s failed %d time(s); giving up: %s",
            goal.deployment_id,
            goal.failures,
            failure.message,
        )
        return
    goal.backoff_s = min(goal.backoff_s * 2, BACKOFF_MAX_S) if goal.backoff_s else BACKOFF_START_S
    goal.retry_at_s = now_s + goal.backoff_s
    logger.warning(
        "Deployment %s failed to start %d times in a row; next start in %.0fs: %s",
        goal.deployment_id,
        goal.failures,
        goal.backoff_s,
        failure.message,
    )


def count_start(goal: DeploymentGoal, node: str) -> None:
    """A replica of the goal's code version started: the failure streaks end."""
    goal.ever_running = True
    goal.failures = 0
    goal.backoff_s = goal.retry_at_s = 0.0
    goal.node_failures.pop(node, None)
