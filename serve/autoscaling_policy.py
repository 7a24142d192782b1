"""Autoscaling policy functions (Ray's ``ray.serve.autoscaling_policy``).

A custom policy takes an ``AutoscalingContext`` and returns ``(num_replicas, policy_state)``;
name it in ``autoscaling_config={"policy": {"policy_function": "module:name"}}``. The
controller applies the config's scaling factors, delays and bounds to whatever it returns.

Example::

    from serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    def at_least_two(ctx):
        wanted, state = replica_queue_length_autoscaling_policy(ctx)
        return max(wanted, 2), state
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from serve.config import AutoscalingContext

__all__ = [
    "apply_autoscaling_config",
    "default_autoscaling_policy",
    "replica_queue_length_autoscaling_policy",
]

F = TypeVar("F", bound=Callable[..., Any])


def replica_queue_length_autoscaling_policy(
    ctx: AutoscalingContext,
) -> tuple[int | float, dict[str, Any]]:
    """Serve's default policy: enough replicas for ``target_ongoing_requests`` each, counting
    requests running in replicas and queued in handles (averaged over the look-back period).
    With no replica running it keeps the target (the controller starts one at once when
    requests wait)."""
    if ctx.current_num_replicas == 0 or ctx.config is None:
        return ctx.target_num_replicas, {}
    return ctx.total_num_requests / ctx.config.get_target_ongoing_requests(), {}


default_autoscaling_policy = replica_queue_length_autoscaling_policy


def apply_autoscaling_config(policy: F) -> F:
    """Mark a policy as one the autoscaling config's factors, delays and bounds apply to.

    Serve applies them to every custom policy, so this returns the policy unchanged (Ray's
    earlier releases needed it).
    """
    return policy
