"""A deploy turned into an application's goal: validated, and carrying over what still holds."""

from __future__ import annotations

import logging
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


def count_failure(goal: DeploymentGoal, failure: Failure) -> None:
    """A replica of the goal's code version failed to start; past the limit, the deploy fails.

    Only while no replica of this version ever ran: a version that ran is not a failed deploy.
    """
    goal.failures += 1
    goal.last_error = failure
    if not goal.ever_running and goal.failures >= goal.failure_limit():
        goal.failed = True
        logger.error(
            "Deployment %s failed %d time(s); giving up: %s",
            goal.deployment_id,
            goal.failures,
            failure.message,
        )
