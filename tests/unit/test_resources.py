"""Resource requests from ray_actor_options, and one node's capacity: pure, no processes."""

from __future__ import annotations

import pytest

from controller.resources import NodeCapacity, ResourceRequest
from serve._models import DeploymentConfig
from serve._options import validate_deployment_options


def request(**options: object) -> ResourceRequest:
    return ResourceRequest.from_config(DeploymentConfig(ray_actor_options=options), "app#D")


def test_a_request_is_spelled_as_in_ray_with_ray_defaults() -> None:
    assert request() == ResourceRequest(num_cpus=1.0, group="app#D")
    r = ResourceRequest.from_config(
        DeploymentConfig(
            ray_actor_options={
                "num_cpus": 0.5,
                "num_gpus": 2,
                "memory": 2**30,
                "resources": {"tpu": 1, "none": 0},
            },
            max_replicas_per_node=2,
        ),
        "app#D",
    )
    assert (r.num_cpus, r.num_gpus, r.memory_bytes, r.custom) == (0.5, 2.0, 2**30, (("tpu", 1.0),))
    assert r.max_replicas_per_node == 2
    assert r.describe() == (
        '{"CPU": 0.5, "GPU": 2.0, "memory": 1073741824, "tpu": 1.0} with max_replicas_per_node=2'
    )
    assert request(num_cpus=0).num_cpus == 0.0


@pytest.mark.parametrize(
    "options",
    [
        {"num_cpus": -1},
        {"num_gpus": "1"},
        {"memory": -5},
        {"resources": {"x": -1}},
        {"resources": 3},
    ],
)
def test_bad_resource_values_are_refused_at_deploy_time(options: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError), match="ray_actor_options"):
        validate_deployment_options({"ray_actor_options": options})


def test_no_caps_by_default_so_laptops_keep_working() -> None:
    node = NodeCapacity()
    for i in range(50):
        assert node.why_not(request(num_cpus=4, num_gpus=1)) is None
        assert node.take(f"r{i}", request(num_cpus=4, num_gpus=1)).gpu_ids == ()


def test_cpu_capacity_holds_replicas_back_until_one_leaves() -> None:
    node = NodeCapacity(num_cpus=2)
    node.take("a", request(num_cpus=1.5))
    assert node.why_not(request()) == "needs 1 CPU(s); 0.5 of 2 free"
    assert node.why_not(request(num_cpus=0.5)) is None
    assert node.never_fits(request(num_cpus=3)) == (
        "needs 3 CPU(s) but this node has 2 (serve-controller --num-cpus)"
    )
    node.release("a")
    assert node.why_not(request(num_cpus=2)) is None


def test_gpus_are_handed_out_whole_or_shared_by_fractions() -> None:
    node = NodeCapacity(num_gpus=2)
    assert node.take("a", request(num_cpus=0, num_gpus=1)).gpu_ids == (0,)
    assert node.take("b", request(num_cpus=0, num_gpus=0.5)).gpu_ids == (1,)
    assert node.take("c", request(num_cpus=0, num_gpus=0.5)).gpu_ids == (1,)
    assert node.why_not(request(num_gpus=0.5)) == "needs 0.5 GPU(s); 0 of 2 free"
    assert node.never_fits(request(num_gpus=3)) is not None
    node.release("a")
    assert node.take("d", request(num_gpus=1)).gpu_ids == (0,)
    assert node.take("e", request(num_gpus=0)).gpu_ids == ()
    node.release("b")
    node.release("c")
    assert node.take("f", request(num_gpus=1)).gpu_ids == (1,)


def test_max_replicas_per_node_counts_one_deployment_on_this_node() -> None:
    node = NodeCapacity()
    spread = ResourceRequest(max_replicas_per_node=1, group="app#D")
    node.take("a", spread)
    assert node.why_not(spread) == "max_replicas_per_node=1 reached on this node"
    assert node.why_not(ResourceRequest(max_replicas_per_node=1, group="app#Other")) is None
    node.release("a")
    assert node.why_not(spread) is None


def test_a_request_survives_the_state_database() -> None:
    request = ResourceRequest(
        num_cpus=2.0,
        num_gpus=0.5,
        memory_bytes=2**30,
        custom=(("nvme", 1.0),),
        max_replicas_per_node=1,
        group="app#Model",
    )
    assert ResourceRequest.from_json(request.to_json()) == request
    assert ResourceRequest.from_json("") == ResourceRequest()
    assert ResourceRequest.from_json("not json") == ResourceRequest()
