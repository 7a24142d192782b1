"""gang_scheduling_config as a deployment option: Ray's names, Ray's rules, clear errors."""

from __future__ import annotations

import pytest

import serve
from serve.config import GangPlacementStrategy, GangRuntimeFailurePolicy, GangSchedulingConfig
from serve.gang import GangContext


class Model:
    pass


def test_the_config_travels_as_json_types_with_rays_defaults() -> None:
    deployment = serve.deployment(
        num_replicas=4,
        gang_scheduling_config=GangSchedulingConfig(
            gang_size=2, gang_placement_strategy=GangPlacementStrategy.STRICT_SPREAD
        ),
    )(Model)
    assert deployment._config.gang_scheduling_config == {
        "gang_size": 2,
        "gang_timeout_s": 300.0,
        "gang_placement_strategy": "STRICT_SPREAD",
        "max_retries": 3,
        "runtime_failure_policy": "RESTART_GANG",
    }
    as_dict = deployment.options(
        gang_scheduling_config={"gang_size": 4, "runtime_failure_policy": "RESTART_REPLICA"}
    )
    assert as_dict._config.gang_scheduling_config["gang_size"] == 4
    assert (
        as_dict._config.gang_scheduling_config["runtime_failure_policy"]
        == GangRuntimeFailurePolicy.RESTART_REPLICA
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_replicas": 3, "gang_scheduling_config": {"gang_size": 2}}, "multiple of gang_size"),
        ({"gang_scheduling_config": {"gang_size": 0}}, "gang_size must be an integer >= 1"),
        ({"gang_scheduling_config": {}}, "gang_size is required"),
        ({"gang_scheduling_config": {"gang_size": 1, "size": 2}}, "unknown field"),
        (
            {"gang_scheduling_config": {"gang_size": 1, "gang_placement_strategy": "RANDOM"}},
            "must be one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD",
        ),
        (
            {"max_replicas_per_node": 1, "gang_scheduling_config": {"gang_size": 1}},
            "max_replicas_per_node cannot be used together",
        ),
        (
            {
                "autoscaling_config": {"min_replicas": 2, "max_replicas": 5},
                "gang_scheduling_config": {"gang_size": 2},
            },
            r"max_replicas \(5\) must be a multiple of gang_size \(2\)",
        ),
        (
            {
                "autoscaling_config": {"min_replicas": 0, "max_replicas": 4},
                "gang_scheduling_config": {"gang_size": 2},
            },
            "min_replicas=0",
        ),
    ],
)
def test_bad_gang_options_say_what_is_wrong(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve.deployment(**options)(Model)


def test_gang_context_reads_rays_fields() -> None:
    context = GangContext.from_dict(
        {"gang_id": "g", "rank": 1, "world_size": 2, "member_replica_ids": ["a", "b"]}
    )
    assert (context.rank, context.world_size, context.member_replica_ids) == (1, 2, ["a", "b"])
    assert GangContext.from_dict(context.to_dict()) == context
