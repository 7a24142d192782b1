"""Protobuf <-> internal dataclasses, for the SDK and both daemons."""

from __future__ import annotations

from typing import Any

import orjson

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
from serve.config import (
    AggregationFunction,
    AutoscalingConfig,
    AutoscalingPolicy,
    BackpressureConfig,
    RequestRouterConfig,
)
from serve.metrics import Sample
from serve.schema import (
    ApplicationStatusOverview,
    DeploymentStatusOverview,
    ProxyDetails,
    ScalingDecision,
    ServeStatus,
)


def config_to_proto(config: DeploymentConfig) -> common_pb2.DeploymentConfig:
    msg = common_pb2.DeploymentConfig(
        num_replicas=config.num_replicas or 0,
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_wait_loop_s=config.graceful_shutdown_wait_loop_s,
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        max_constructor_retry_count=config.max_constructor_retry_count,
        max_replicas_per_node=config.max_replicas_per_node or 0,
    )
    user_config = config.user_config_json()
    if user_config is not None:
        msg.user_config_json = user_config
    if config.logging_config:
        msg.logging_config_json = orjson.dumps(config.logging_config)
    if config.ray_actor_options:
        msg.ray_actor_options_json = orjson.dumps(config.ray_actor_options)
    if config.gang_scheduling_config:
        msg.gang_scheduling_config_json = orjson.dumps(config.gang_scheduling_config)
    auto = config.autoscaling_config
    if auto is not None:
        msg.autoscaling.CopyFrom(
            common_pb2.AutoscalingConfig(
                min_replicas=auto.min_replicas,
                max_replicas=auto.max_replicas,
                target_ongoing_requests=auto.target_ongoing_requests,
                metrics_interval_s=auto.metrics_interval_s,
                look_back_period_s=auto.look_back_period_s,
                upscale_delay_s=auto.upscale_delay_s,
                downscale_delay_s=auto.downscale_delay_s,
            )
        )
        for name in (
            "initial_replicas",
            "upscaling_factor",
            "downscaling_factor",
            "downscale_to_zero_delay_s",
            "smoothing_factor",
            "upscale_smoothing_factor",
            "downscale_smoothing_factor",
        ):
            value = getattr(auto, name)
            if value is not None:
                setattr(msg.autoscaling, name, value)
        msg.autoscaling.aggregation_function = auto.aggregation_function.value
        if not auto.policy.is_default_policy_function():
            msg.autoscaling.policy.CopyFrom(policy_to_proto(auto.policy))
    if config.request_router_config is not None:
        msg.request_router.CopyFrom(router_config_to_proto(config.request_router_config))
    msg.rolling_update_percentage = config.rolling_update_percentage
    msg.max_surge_percent = config.max_surge_percent
    if config.backpressure_config is not None:
        msg.backpressure.CopyFrom(backpressure_to_proto(config.backpressure_config))
    return msg


def backpressure_to_proto(config: BackpressureConfig) -> common_pb2.BackpressureConfig:
    msg = common_pb2.BackpressureConfig(status_code=config.status_code)
    if config.retry_after_s is not None:
        msg.retry_after_s = config.retry_after_s
    return msg


def backpressure_from_proto(msg: common_pb2.BackpressureConfig) -> BackpressureConfig:
    return BackpressureConfig(
        status_code=msg.status_code or 503,
        retry_after_s=msg.retry_after_s if msg.HasField("retry_after_s") else None,
    )


def policy_to_proto(policy: AutoscalingPolicy) -> common_pb2.AutoscalingPolicy:
    return common_pb2.AutoscalingPolicy(
        policy_function=str(policy.policy_function),
        serialized=policy._serialized_policy_def,
        policy_kwargs_json=orjson.dumps(policy.policy_kwargs),
    )


def policy_from_proto(msg: common_pb2.AutoscalingPolicy) -> AutoscalingPolicy:
    if not msg.serialized:
        return AutoscalingPolicy()
    return AutoscalingPolicy(
        policy_function=msg.policy_function,
        policy_kwargs=orjson.loads(msg.policy_kwargs_json or b"{}"),
        _serialized_policy_def=msg.serialized,
    )


_ROUTER_NUMBERS = (  # RequestRouterConfig's numeric fields: the same names on the wire
    "request_routing_stats_period_s",
    "request_routing_stats_timeout_s",
    "initial_backoff_s",
    "backoff_multiplier",
    "max_backoff_s",
)


def router_config_to_proto(config: RequestRouterConfig) -> common_pb2.RequestRouterConfig:
    return common_pb2.RequestRouterConfig(
        request_router_class=str(config.request_router_class),
        serialized=config._serialized_request_router_cls,
        request_router_kwargs_json=orjson.dumps(config.request_router_kwargs),
        **{name: getattr(config, name) for name in _ROUTER_NUMBERS},
    )


def router_config_from_proto(msg: common_pb2.RequestRouterConfig) -> RequestRouterConfig:
    return RequestRouterConfig(
        request_router_class=msg.request_router_class,
        request_router_kwargs=orjson.loads(msg.request_router_kwargs_json or b"{}"),
        _serialized_request_router_cls=msg.serialized,
        **{name: getattr(msg, name) for name in _ROUTER_NUMBERS},
    )


def config_from_proto(msg: common_pb2.DeploymentConfig) -> DeploymentConfig:
    autoscaling: AutoscalingConfig | None = None
    if msg.HasField("autoscaling"):
        a = msg.autoscaling
        autoscaling = AutoscalingConfig(
            min_replicas=a.min_replicas,
            max_replicas=a.max_replicas,
            initial_replicas=a.initial_replicas if a.HasField("initial_replicas") else None,
            target_ongoing_requests=a.target_ongoing_requests,
            metrics_interval_s=a.metrics_interval_s,
            look_back_period_s=a.look_back_period_s,
            upscale_delay_s=a.upscale_delay_s,
            downscale_delay_s=a.downscale_delay_s,
            upscaling_factor=a.upscaling_factor if a.HasField("upscaling_factor") else None,
            downscaling_factor=a.downscaling_factor if a.HasField("downscaling_factor") else None,
            downscale_to_zero_delay_s=(
                a.downscale_to_zero_delay_s if a.HasField("downscale_to_zero_delay_s") else None
            ),
            smoothing_factor=a.smoothing_factor if a.HasField("smoothing_factor") else 1.0,
            upscale_smoothing_factor=(
                a.upscale_smoothing_factor if a.HasField("upscale_smoothing_factor") else None
            ),
            downscale_smoothing_factor=(
                a.downscale_smoothing_factor if a.HasField("downscale_smoothing_factor") else None
            ),
            aggregation_function=AggregationFunction(a.aggregation_function or "mean"),
            policy=policy_from_proto(a.policy) if a.HasField("policy") else AutoscalingPolicy(),
        )
    user_config: Any = None
    if msg.HasField("user_config_json"):
        user_config = orjson.loads(msg.user_config_json)
    return DeploymentConfig(
        num_replicas=None if autoscaling is not None else msg.num_replicas,
        max_ongoing_requests=msg.max_ongoing_requests,
        max_queued_requests=msg.max_queued_requests,
        user_config=user_config,
        autoscaling_config=autoscaling,
        graceful_shutdown_wait_loop_s=msg.graceful_shutdown_wait_loop_s,
        graceful_shutdown_timeout_s=msg.graceful_shutdown_timeout_s,
        health_check_period_s=msg.health_check_period_s,
        health_check_timeout_s=msg.health_check_timeout_s,
        max_constructor_retry_count=msg.max_constructor_retry_count,
        logging_config=orjson.loads(msg.logging_config_json) if msg.logging_config_json else None,
        ray_actor_options=(
            orjson.loads(msg.ray_actor_options_json) if msg.ray_actor_options_json else None
        ),
        max_replicas_per_node=msg.max_replicas_per_node or None,
        request_router_config=(
            router_config_from_proto(msg.request_router) if msg.HasField("request_router") else None
        ),
        rolling_update_percentage=(
            msg.rolling_update_percentage if msg.HasField("rolling_update_percentage") else 0.2
        ),
        max_surge_percent=msg.max_surge_percent,
        backpressure_config=(
            backpressure_from_proto(msg.backpressure) if msg.HasField("backpressure") else None
        ),
        gang_scheduling_config=(
            orjson.loads(msg.gang_scheduling_config_json)
            if msg.gang_scheduling_config_json
            else None
        ),
    )


def spec_to_proto(spec: DeploymentSpec) -> common_pb2.DeploymentSpec:
    return common_pb2.DeploymentSpec(
        name=spec.name,
        serialized_callable=spec.serialized_callable,
        serialized_init_args=spec.serialized_init_args,
        code_version=spec.code_version,
        config=config_to_proto(spec.config),
    )


def user_metric_to_proto(sample: Sample) -> controller_pb2.UserMetric:
    return controller_pb2.UserMetric(
        name=sample.name,
        kind=sample.kind,
        description=sample.description,
        tags=dict(sample.tags),
        value=sample.value,
        boundaries=list(sample.boundaries),
        bucket_counts=list(sample.buckets),
        sum=sample.sum,
        count=sample.count,
    )


def user_metric_from_proto(msg: controller_pb2.UserMetric) -> Sample:
    return Sample(
        name=msg.name,
        kind=msg.kind,
        description=msg.description,
        tags=tuple(sorted(msg.tags.items())),
        value=msg.value,
        boundaries=tuple(msg.boundaries),
        buckets=tuple(msg.bucket_counts),
        sum=msg.sum,
        count=msg.count,
    )


def spec_from_proto(msg: common_pb2.DeploymentSpec) -> DeploymentSpec:
    return DeploymentSpec(
        name=msg.name,
        serialized_callable=msg.serialized_callable,
        serialized_init_args=msg.serialized_init_args,
        code_version=msg.code_version,
        config=config_from_proto(msg.config),
    )


def code_env_to_proto(env: CodeEnv) -> common_pb2.CodeEnv:
    return common_pb2.CodeEnv(cwd=env.cwd, sys_path=list(env.sys_path))


def code_env_from_proto(msg: common_pb2.CodeEnv) -> CodeEnv:
    return CodeEnv(cwd=msg.cwd, sys_path=tuple(msg.sys_path))


def deployment_id_to_proto(deployment_id: DeploymentID) -> common_pb2.DeploymentId:
    return common_pb2.DeploymentId(app=deployment_id.app_name, name=deployment_id.name)


def deployment_id_from_proto(msg: common_pb2.DeploymentId) -> DeploymentID:
    return DeploymentID(msg.name, msg.app)


def replica_set_to_proto(rs: ReplicaSet) -> common_pb2.ReplicaSet:
    return common_pb2.ReplicaSet(
        version=rs.version,
        exists=rs.exists,
        replicas=[
            common_pb2.ReplicaInfo(
                replica_id=r.replica_id,
                address=r.address,
                host=r.host,
                max_ongoing_requests=r.max_ongoing_requests,
                model_ids=sorted(r.model_ids),
                routing_stats_json=r.routing_stats_json,
                ingress_http_address=r.ingress_http_address,
                ingress_grpc_address=r.ingress_grpc_address,
            )
            for r in rs.replicas
        ],
        max_queued_requests=rs.max_queued_requests,
        max_ongoing_requests=rs.max_ongoing_requests,
        autoscaling=rs.autoscaling,
        metrics_interval_s=rs.metrics_interval_s,
        unavailable=rs.unavailable,
        request_router=(
            router_config_to_proto(rs.request_router) if rs.request_router is not None else None
        ),
        backpressure=(
            backpressure_to_proto(rs.backpressure) if rs.backpressure is not None else None
        ),
    )


def replica_set_from_proto(msg: common_pb2.ReplicaSet) -> ReplicaSet:
    return ReplicaSet(
        version=msg.version,
        exists=msg.exists,
        replicas=tuple(
            ReplicaInfo(
                replica_id=r.replica_id,
                address=r.address,
                host=r.host,
                max_ongoing_requests=r.max_ongoing_requests,
                model_ids=frozenset(r.model_ids),
                routing_stats_json=r.routing_stats_json,
                ingress_http_address=r.ingress_http_address,
                ingress_grpc_address=r.ingress_grpc_address,
            )
            for r in msg.replicas
        ),
        max_queued_requests=msg.max_queued_requests,
        max_ongoing_requests=msg.max_ongoing_requests,
        autoscaling=msg.autoscaling,
        metrics_interval_s=msg.metrics_interval_s,
        unavailable=msg.unavailable,
        request_router=(
            router_config_from_proto(msg.request_router) if msg.HasField("request_router") else None
        ),
        backpressure=(
            backpressure_from_proto(msg.backpressure) if msg.HasField("backpressure") else None
        ),
    )


def _enum(kind: Any, value: str, default: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        return default


def application_status_from_proto(
    msg: controller_pb2.ApplicationStatus,
) -> ApplicationStatusOverview:
    deployments = {
        d.name: DeploymentStatusOverview(
            status=_enum(DeploymentStatus, d.status, DeploymentStatus.UPDATING),
            status_trigger=_enum(
                DeploymentStatusTrigger, d.status_trigger, DeploymentStatusTrigger.UNSPECIFIED
            ),
            replica_states={
                _enum(ReplicaState, k, k): v for k, v in sorted(d.replica_states.items())
            },
            message=d.message,
            autoscaling_policy=d.autoscaling_policy,
            scaling_decisions=tuple(
                ScalingDecision(
                    timestamp_s=s.timestamp_s,
                    prev_num_replicas=s.prev_num_replicas,
                    curr_num_replicas=s.curr_num_replicas,
                    policy=s.policy,
                    reason=s.reason,
                )
                for s in d.scaling_decisions
            ),
        )
        for d in msg.deployments
    }
    return ApplicationStatusOverview(
        status=_enum(ApplicationStatus, msg.status, ApplicationStatus.NOT_STARTED),
        message=msg.message,
        last_deployed_time_s=msg.last_deployed_time_s,
        deployments=deployments,
        route_prefix=msg.route_prefix if msg.HasField("route_prefix") else None,
    )


def serve_status_from_proto(msg: controller_pb2.GetStatusResponse) -> ServeStatus:
    return ServeStatus(
        applications={a.name: application_status_from_proto(a) for a in msg.applications},
        proxies={p.node_id: p.status for p in msg.proxies},
        proxy_details={
            p.node_id: ProxyDetails(
                p.status, p.http_address, p.grpc_address, p.pid, p.message, p.https
            )
            for p in msg.proxies
        },
        dashboard_url=msg.dashboard_url,
    )
