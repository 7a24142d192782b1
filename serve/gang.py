"""Gang scheduling, as Ray Serve spells it: groups of ``gang_size`` replicas placed and started
together or not at all, and restarted together when one of them fails.

``GangSchedulingConfig`` (also in ``serve.config``) is a deployment option; ``GangContext`` is
what each member finds in ``serve.get_replica_context().gang_context``: its gang, its rank in
it, and its peers, so the members can find each other (NCCL, data-parallel ranks, ...).

Example::

    from serve.config import GangPlacementStrategy, GangSchedulingConfig

    @serve.deployment(
        num_replicas=4,
        gang_scheduling_config=GangSchedulingConfig(
            gang_size=2, gang_placement_strategy=GangPlacementStrategy.SPREAD
        ),
    )
    class Shard:
        def __init__(self):
            gang = serve.get_replica_context().gang_context
            self.rank, self.peers = gang.rank, gang.member_replica_ids
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

__all__ = [
    "GangContext",
    "GangPlacementStrategy",
    "GangRuntimeFailurePolicy",
    "GangSchedulingConfig",
]


class GangPlacementStrategy(enum.StrEnum):
    """Where a gang's members go (on Slurm: flags of the gang's one job)."""

    PACK = "PACK"  # as few nodes as possible, best effort
    SPREAD = "SPREAD"  # as many nodes as possible, best effort (--spread-job)
    STRICT_PACK = "STRICT_PACK"  # one node (--nodes=1)
    STRICT_SPREAD = "STRICT_SPREAD"  # one member per node (--ntasks-per-node=1)


class GangRuntimeFailurePolicy(enum.StrEnum):
    """What happens to a running gang when one of its members fails."""

    RESTART_GANG = "RESTART_GANG"  # every member is stopped and a new gang started
    RESTART_REPLICA = "RESTART_REPLICA"  # accepted; as in Ray today, acts as RESTART_GANG


@dataclasses.dataclass(frozen=True)
class GangSchedulingConfig:
    """How a deployment's replicas form gangs; ``num_replicas`` (and, when autoscaling, the
    replica bounds) must be multiples of ``gang_size``.

    ``gang_timeout_s`` and ``max_retries`` are accepted as in Ray; a gang that cannot be placed
    waits (pending, with the cluster manager's reason), and one whose start fails is retried
    like any replica start (with backoff).
    """

    gang_size: int
    gang_timeout_s: float = 300.0
    gang_placement_strategy: GangPlacementStrategy = GangPlacementStrategy.PACK
    max_retries: int = 3
    runtime_failure_policy: GangRuntimeFailurePolicy = GangRuntimeFailurePolicy.RESTART_GANG

    def __post_init__(self) -> None:
        _whole(self.gang_size, "gang_size", minimum=1)
        _whole(self.max_retries, "max_retries", minimum=0)
        timeout = self.gang_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(
                f"gang_scheduling_config: gang_timeout_s must be > 0, got {timeout!r}."
            )
        object.__setattr__(
            self,
            "gang_placement_strategy",
            _member(GangPlacementStrategy, self.gang_placement_strategy, "gang_placement_strategy"),
        )
        object.__setattr__(
            self,
            "runtime_failure_policy",
            _member(
                GangRuntimeFailurePolicy, self.runtime_failure_policy, "runtime_failure_policy"
            ),
        )

    @classmethod
    def from_value(cls, value: GangSchedulingConfig | Mapping[str, Any]) -> GangSchedulingConfig:
        """Accept a ``GangSchedulingConfig`` or a dict of its fields; unknown keys are an
        error naming the valid ones."""
        if isinstance(value, GangSchedulingConfig):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                "gang_scheduling_config must be a dict or GangSchedulingConfig, got "
                f"{type(value).__name__}."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(
                f"gang_scheduling_config: unknown field(s) {unknown}; valid fields are "
                f"{sorted(fields)}."
            )
        if "gang_size" not in value:
            raise ValueError("gang_scheduling_config: gang_size is required.")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """JSON types (how a deployment's config carries it)."""
        return {
            "gang_size": self.gang_size,
            "gang_timeout_s": float(self.gang_timeout_s),
            "gang_placement_strategy": self.gang_placement_strategy.value,
            "max_retries": self.max_retries,
            "runtime_failure_policy": self.runtime_failure_policy.value,
        }


@dataclasses.dataclass(frozen=True)
class GangContext:
    """A gang member's view of its gang (``serve.get_replica_context().gang_context``)."""

    gang_id: str  # unique per gang (a restarted gang is a new one)
    rank: int  # this replica's rank in the gang, 0 .. world_size - 1
    world_size: int  # the gang's size (gang_size)
    member_replica_ids: list[str]  # the members' replica ids (unique ids), by rank
    pg_name: str = ""  # Ray's placement group name; here the gang's job (Slurm) or ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GangContext:
        return cls(
            gang_id=str(data["gang_id"]),
            rank=int(data["rank"]),
            world_size=int(data["world_size"]),
            member_replica_ids=[str(m) for m in data["member_replica_ids"]],
            pg_name=str(data.get("pg_name", "")),
        )


def gang_option(value: Any) -> dict[str, Any] | None:
    """The ``gang_scheduling_config`` deployment option, normalized to JSON types."""
    if value is None:
        return None
    return GangSchedulingConfig.from_value(value).to_dict()


def check_gang_fits(
    gang: Mapping[str, Any] | None,
    *,
    num_replicas: int | None,
    replica_bounds: tuple[int, int, int | None] | None,
    max_replicas_per_node: int | None,
) -> None:
    """Ray's rules: replica counts are whole gangs, and no max_replicas_per_node with gangs.

    ``replica_bounds`` is (min, max, initial) when autoscaling."""
    if gang is None:
        return
    size = int(gang["gang_size"])
    if max_replicas_per_node is not None:
        raise ValueError(
            "serve.deployment: max_replicas_per_node cannot be used together with "
            "gang_scheduling_config; use gang_placement_strategy to place a gang's members."
        )
    if num_replicas is not None and num_replicas % size:
        raise ValueError(
            f"serve.deployment: num_replicas ({num_replicas}) must be a multiple of gang_size "
            f"({size}): gangs are never partial."
        )
    if replica_bounds is not None:
        low, high, initial = replica_bounds
        if low == 0:
            raise ValueError(
                "serve.deployment: autoscaling to zero (min_replicas=0) is not supported with "
                "gang_scheduling_config."
            )
        for name, count in (
            ("min_replicas", low),
            ("max_replicas", high),
            ("initial_replicas", initial),
        ):
            if count is not None and count % size:
                raise ValueError(
                    f"serve.deployment: autoscaling_config {name} ({count}) must be a multiple "
                    f"of gang_size ({size})."
                )


def _whole(value: object, name: str, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"gang_scheduling_config: {name} must be an integer >= {minimum}, got {value!r}."
        )


def _member(kind: type[enum.StrEnum], value: object, name: str) -> Any:
    try:
        return kind(str(value))
    except ValueError:
        valid = ", ".join(m.value for m in kind)
        raise ValueError(
            f"gang_scheduling_config: {name} must be one of {valid}, got {value!r}."
        ) from None
