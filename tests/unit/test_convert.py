"""serve._rpc.convert: what the SDK and the daemons say to each other survives the wire.

Each value goes to its protobuf message, through bytes (as gRPC sends it), and back.
"""

from __future__ import annotations

from typing import Any

import pytest

from serve._models import (
    ApplicationStatus,
    CodeEnv,
    DeploymentConfig,
    DeploymentID,
    DeploymentSpec,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ReplicaInfo,
    ReplicaSet,
    ReplicaState,
)
from serve._proto import common_pb2, controller_pb2
from serve._rpc import convert
from serve.config import (
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingPolicy,
    BackpressureConfig,
    RequestRouterConfig,
)
from serve.metrics import Sample
from serve.schema import ProxyDetails, ScalingDecision


def over_the_wire(msg: Any) -> Any:
    return type(msg).FromString(msg.SerializeToString())


def config_round_trip(config: DeploymentConfig) -> DeploymentConfig:
    return convert.config_from_proto(over_the_wire(convert.config_to_proto(config)))


def policy(context: Any) -> tuple[int, dict[str, Any]]:
    return 1, {}


def test_a_config_with_every_field_set_survives() -> None:
    config = DeploymentConfig(
        num_replicas=3,
        max_ongoing_requests=7,
        max_queued_requests=11,
        user_config={"threshold": 0.5, "labels": ["a", "b"]},
        graceful_shutdown_wait_loop_s=1.5,
        graceful_shutdown_timeout_s=9.0,
        health_check_period_s=2.0,
        health_check_timeout_s=4.0,
        max_constructor_retry_count=6,
        logging_config={"log_level": "DEBUG", "encoding": "JSON"},
        ray_actor_options={"num_cpus": 2, "runtime_env": {"env_vars": {"A": "1"}}},
        max_replicas_per_node=2,
        request_router_config=RequestRouterConfig(
            request_router_class="tests.support.extensions:StickyRouter",
            request_router_kwargs={"key": "user"},
            request_routing_stats_period_s=3.0,
            request_routing_stats_timeout_s=1.0,
            initial_backoff_s=0.1,
            backoff_multiplier=3.0,
            max_backoff_s=2.0,
        ),
        rolling_update_percentage=0.5,
        max_surge_percent=25.0,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=5),
        gang_scheduling_config={"gang_size": 2, "gang_timeout_s": 60.0},
    )
    assert config_round_trip(config) == config


def test_an_autoscaled_config_survives_and_has_no_fixed_count() -> None:
    auto = AutoscalingConfig(
        min_replicas=0,
        initial_replicas=2,
        max_replicas=8,
        target_ongoing_requests=3.0,
        metrics_interval_s=1.0,
        look_back_period_s=5.0,
        upscaling_factor=2.0,
        downscaling_factor=0.5,
        upscale_delay_s=1.0,
        downscale_delay_s=20.0,
        downscale_to_zero_delay_s=60.0,
        aggregation_function=AggregationFunction.MAX,
        policy=AutoscalingPolicy(policy_function=policy, policy_kwargs={"step": 2}),
    )
    back = config_round_trip(DeploymentConfig(num_replicas=None, autoscaling_config=auto))
    assert back.num_replicas is None
    assert back.autoscaling_config == auto
    assert back.autoscaling_config.policy.get_policy()(None) == (1, {})


def test_unset_optional_autoscaling_fields_stay_unset() -> None:
    auto = AutoscalingConfig(min_replicas=1, max_replicas=2)
    back = config_round_trip(DeploymentConfig(num_replicas=None, autoscaling_config=auto))
    assert back.autoscaling_config is not None
    for name in ("initial_replicas", "upscaling_factor", "downscaling_factor"):
        assert getattr(back.autoscaling_config, name) is None, name
    assert back.autoscaling_config.downscale_to_zero_delay_s is None
    assert back.autoscaling_config.policy.is_default_policy_function()
    assert back.autoscaling_config == auto


def test_smoothing_factors_survive() -> None:
    auto = AutoscalingConfig(
        max_replicas=4,
        smoothing_factor=0.5,
        upscale_smoothing_factor=0.7,
        downscale_smoothing_factor=0.3,
    )
    back = config_round_trip(DeploymentConfig(num_replicas=None, autoscaling_config=auto))
    assert back.autoscaling_config == auto


def test_defaults_survive_and_unset_means_the_default() -> None:
    assert config_round_trip(DeploymentConfig()) == DeploymentConfig()
    config = DeploymentConfig(max_replicas_per_node=None, backpressure_config=None)
    back = config_round_trip(config)
    assert back.max_replicas_per_node is None
    assert back.backpressure_config is None
    assert back.request_router_config is None
    assert back.user_config is None


@pytest.mark.parametrize("value", [0, "", [], {}, False])
def test_a_falsy_user_config_is_still_a_user_config(value: Any) -> None:
    assert config_round_trip(DeploymentConfig(user_config=value)).user_config == value


def test_a_peer_that_sends_no_rolling_update_percentage_gets_rays_default() -> None:
    msg = convert.config_to_proto(DeploymentConfig(rolling_update_percentage=0.9))
    msg.ClearField("rolling_update_percentage")
    assert convert.config_from_proto(msg).rolling_update_percentage == 0.2


def test_backpressure_without_retry_after() -> None:
    config = BackpressureConfig(status_code=503)
    assert convert.backpressure_from_proto(convert.backpressure_to_proto(config)) == config
    # A peer that leaves the status out means Ray's default.
    assert convert.backpressure_from_proto(common_pb2.BackpressureConfig()).status_code == 503


def test_a_policy_message_without_its_code_is_the_default_policy() -> None:
    msg = common_pb2.AutoscalingPolicy(policy_function="somewhere:else")
    assert convert.policy_from_proto(msg) == AutoscalingPolicy()


def test_a_spec_survives() -> None:
    spec = DeploymentSpec(
        name="Model",
        serialized_callable=b"\x00code",
        serialized_init_args=b"\x01args",
        code_version="v3",
        config=DeploymentConfig(num_replicas=2, user_config={"a": 1}),
    )
    assert convert.spec_from_proto(over_the_wire(convert.spec_to_proto(spec))) == spec


def test_code_env_and_deployment_id_survive() -> None:
    env = CodeEnv(cwd="/srv/app", sys_path=("/srv/app", "/opt/lib"))
    assert convert.code_env_from_proto(over_the_wire(convert.code_env_to_proto(env))) == env
    deployment_id = DeploymentID("Model", "app")
    msg = over_the_wire(convert.deployment_id_to_proto(deployment_id))
    assert (msg.app, msg.name) == ("app", "Model")
    assert convert.deployment_id_from_proto(msg) == deployment_id


def test_a_replica_set_survives() -> None:
    replica_set = ReplicaSet(
        version=12,
        exists=True,
        replicas=(
            ReplicaInfo("app#Model#a", "10.0.0.1:4000", "node-1", 3, frozenset({"m1", "m2"})),
            ReplicaInfo("app#Model#b", "10.0.0.2:4000", "", 5, frozenset(), b'{"load": 2}'),
        ),
        max_queued_requests=100,
        max_ongoing_requests=3,
        autoscaling=True,
        metrics_interval_s=0.5,
        request_router=RequestRouterConfig(
            request_router_class="tests.support.extensions:StickyRouter"
        ),
        backpressure=BackpressureConfig(status_code=429, retry_after_s=1.5),
    )
    msg = over_the_wire(convert.replica_set_to_proto(replica_set))
    assert list(msg.replicas[0].model_ids) == ["m1", "m2"]  # sorted: the same set, same bytes
    assert convert.replica_set_from_proto(msg) == replica_set


def test_an_unavailable_replica_set_says_why() -> None:
    replica_set = ReplicaSet(version=3, exists=True, unavailable="the deploy failed: boom")
    back = convert.replica_set_from_proto(over_the_wire(convert.replica_set_to_proto(replica_set)))
    assert back == replica_set
    assert back.request_router is None
    assert back.backpressure is None


def test_a_user_metric_survives_with_its_tags_sorted() -> None:
    sample = Sample(
        name="latency",
        kind="histogram",
        description="how long",
        tags=(("model", "a"), ("route", "/x")),
        value=0.0,
        boundaries=(0.1, 1.0),
        buckets=(3, 1, 0),
        sum=1.7,
        count=4,
    )
    msg = over_the_wire(convert.user_metric_to_proto(sample))
    assert convert.user_metric_from_proto(msg) == sample
    msg.tags.clear()
    msg.tags.update({"z": "1", "a": "2"})
    assert convert.user_metric_from_proto(msg).tags == (("a", "2"), ("z", "1"))


def status_message(**fields: Any) -> controller_pb2.ApplicationStatus:
    deployment = controller_pb2.DeploymentStatus(
        name="Model",
        status=fields.get("deployment_status", "HEALTHY"),
        status_trigger=fields.get("trigger", "CONFIG_UPDATE_COMPLETED"),
        message="ok",
        replica_states=fields.get("replica_states", {"RUNNING": 2}),
        autoscaling_policy="default",
        scaling_decisions=[
            controller_pb2.ScalingDecision(
                timestamp_s=10.0,
                prev_num_replicas=1,
                curr_num_replicas=2,
                policy="default",
                reason="load",
            )
        ],
    )
    msg = controller_pb2.ApplicationStatus(
        name="app",
        status=fields.get("app_status", "RUNNING"),
        message="",
        last_deployed_time_s=5.0,
        deployments=[deployment],
    )
    if "route_prefix" in fields:
        msg.route_prefix = fields["route_prefix"]
    return msg


def test_an_application_status_reads_as_rays_overview() -> None:
    overview = convert.application_status_from_proto(
        over_the_wire(status_message(route_prefix="/app"))
    )
    assert overview.status is ApplicationStatus.RUNNING
    assert overview.route_prefix == "/app"
    assert overview.last_deployed_time_s == 5.0
    model = overview.deployments["Model"]
    assert model.status is DeploymentStatus.HEALTHY
    assert model.status_trigger is DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
    assert model.replica_states == {ReplicaState.RUNNING: 2}
    assert model.scaling_decisions == (
        ScalingDecision(
            timestamp_s=10.0,
            prev_num_replicas=1,
            curr_num_replicas=2,
            policy="default",
            reason="load",
        ),
    )


def test_no_route_prefix_is_none_not_empty() -> None:
    assert convert.application_status_from_proto(status_message()).route_prefix is None
    empty = convert.application_status_from_proto(status_message(route_prefix=""))
    assert empty.route_prefix == ""


def test_names_from_a_newer_controller_fall_back_instead_of_failing() -> None:
    overview = convert.application_status_from_proto(
        status_message(
            app_status="HIBERNATING",
            deployment_status="MOLTING",
            trigger="SOLAR_FLARE",
            replica_states={"PUPATING": 1, "RUNNING": 1},
        )
    )
    assert overview.status is ApplicationStatus.NOT_STARTED
    model = overview.deployments["Model"]
    assert model.status is DeploymentStatus.UPDATING
    assert model.status_trigger is DeploymentStatusTrigger.UNSPECIFIED
    assert model.replica_states == {"PUPATING": 1, ReplicaState.RUNNING: 1}


def test_serve_status_lists_applications_and_proxies() -> None:
    msg = controller_pb2.GetStatusResponse(
        applications=[status_message()],
        proxies=[
            controller_pb2.ProxyStatus(
                node_id="node-1",
                status="HEALTHY",
                message="",
                http_address="127.0.0.1:8000",
                grpc_address="127.0.0.1:9000",
                pid=42,
                https=True,
            )
        ],
        dashboard_url="http://127.0.0.1:8265",
    )
    status = convert.serve_status_from_proto(over_the_wire(msg))
    assert list(status.applications) == ["app"]
    assert status.proxies == {"node-1": "HEALTHY"}
    assert status.proxy_details == {
        "node-1": ProxyDetails("HEALTHY", "127.0.0.1:8000", "127.0.0.1:9000", 42, "", True)
    }
    assert status.dashboard_url == "http://127.0.0.1:8265"
