"""The controller's gRPC servicer: protobuf in and out, ``Supervisor`` behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from controller.events import LoadReported, Verdict
from controller.liveness import with_heartbeats
from controller.proxies import ProxyManager
from controller.state import AppGoal
from controller.supervisor import RouteConflict, Supervisor
from serve._models import DeploymentID, ProxyInfo
from serve._proto import common_pb2, controller_pb2
from serve._rpc.channel import Context
from serve._rpc.convert import (
    code_env_from_proto,
    deployment_id_from_proto,
    policy_from_proto,
    replica_set_to_proto,
    spec_from_proto,
    user_metric_from_proto,
)
from serve._settings import settings

logger = logging.getLogger(__name__)


class ControllerServicer:
    """Implements every method of serve.v1.Controller (registered by serve._rpc.service)."""

    def __init__(
        self,
        controller: Supervisor,
        on_shutdown: Callable[[], Any],
        proxies: ProxyManager | None = None,
    ) -> None:
        self._controller = controller
        self._on_shutdown = on_shutdown
        self._proxies = proxies
        self.dashboard_url = ""  # set once the dashboard serves (GetStatus tells it)

    async def Deploy(
        self, request: controller_pb2.DeployRequest, context: Context
    ) -> controller_pb2.DeployResponse:
        if not request.app_name or "#" in request.app_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Invalid application name {request.app_name!r}: use a non-empty name without '#'.",
            )
        try:
            specs = [spec_from_proto(d) for d in request.deployments]
            if not specs:
                raise ValueError("An application needs at least one deployment.")
            for spec in specs:
                if not spec.name or "#" in spec.name:
                    raise ValueError(f"Invalid deployment name {spec.name!r}.")
                if spec.config.max_ongoing_requests < 1:
                    raise ValueError(
                        f"Deployment {spec.name!r}: max_ongoing_requests must be >= 1."
                    )
            await self._controller.deploy(
                app_name=request.app_name,
                route_prefix=request.route_prefix if request.HasField("route_prefix") else None,
                ingress=request.ingress,
                specs=specs,
                code_env=code_env_from_proto(request.code_env),
                config_json=request.config_json,
                autoscaling_policy=(
                    policy_from_proto(request.autoscaling_policy)
                    if request.HasField("autoscaling_policy")
                    else None
                ),
            )
        except RouteConflict as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except (ValueError, TypeError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return controller_pb2.DeployResponse()

    async def DeleteApplication(
        self, request: controller_pb2.DeleteApplicationRequest, context: Context
    ) -> controller_pb2.DeleteApplicationResponse:
        found = await self._controller.delete(request.app_name, wait=request.wait)
        return controller_pb2.DeleteApplicationResponse(found=found)

    def _app_status(self, app: AppGoal) -> controller_pb2.ApplicationStatus:
        status, message = self._controller.app_status(app)
        views = self._controller.deployment_views(app)
        msg = controller_pb2.ApplicationStatus(
            name=app.name,
            status=status.value,
            message=message,
            last_deployed_time_s=app.deployed_at_s,
            ingress=app.ingress,
        )
        if app.route_prefix is not None:
            msg.route_prefix = app.route_prefix
        for name, view in views.items():
            goal = app.deployments[name]
            dep = msg.deployments.add(
                name=name,
                status=view.status.value,
                status_trigger=view.trigger.value,
                message=view.message,
            )
            dep.replica_states.update(view.replica_states)
            auto = goal.spec.config.autoscaling_config
            if auto is not None and app.autoscaling_policy is not None:
                dep.autoscaling_policy = str(app.autoscaling_policy.policy_function)
            elif auto is not None and not auto.policy.is_default_policy_function():
                dep.autoscaling_policy = str(auto.policy.policy_function)
            for record in goal.scaling_decisions:
                dep.scaling_decisions.add(
                    timestamp_s=record.at_s,
                    prev_num_replicas=record.prev_num_replicas,
                    curr_num_replicas=record.curr_num_replicas,
                    policy=record.policy,
                    reason=record.reason,
                )
            if goal.last_error is not None and (goal.failed or goal.failures):
                dep.error.CopyFrom(
                    common_pb2.ErrorInfo(
                        message=goal.last_error.message,
                        traceback=goal.last_error.traceback,
                        pickled=goal.last_error.pickled,
                    )
                )
        return msg

    async def GetStatus(
        self, request: controller_pb2.GetStatusRequest, context: Context
    ) -> controller_pb2.GetStatusResponse:
        proxies = self._proxies.statuses() if self._proxies is not None else []
        return controller_pb2.GetStatusResponse(
            applications=[self._app_status(app) for app in self._controller.apps.values()],
            proxies=[
                controller_pb2.ProxyStatus(
                    node_id=p.node_id,
                    status=p.status,
                    message=p.message,
                    http_address=p.http_address,
                    grpc_address=p.grpc_address,
                    pid=p.pid,
                    https=self._proxies is not None and self._proxies.https,
                )
                for p in proxies
            ],
            dashboard_url=self.dashboard_url,
        )

    async def WaitApplication(
        self, request: controller_pb2.WaitApplicationRequest, context: Context
    ) -> controller_pb2.WaitApplicationResponse:
        app = await self._controller.wait_application(request.app_name, request.timeout_s)
        if app is None:
            return controller_pb2.WaitApplicationResponse(found=False)
        return controller_pb2.WaitApplicationResponse(
            found=True,
            status=self._app_status(app),
            ingress_set_version=self._controller.publisher.published_version(
                DeploymentID(app.ingress, app.name)
            ),
        )

    async def GetApplication(
        self, request: controller_pb2.GetApplicationRequest, context: Context
    ) -> controller_pb2.GetApplicationResponse:
        app = self._controller.apps.get(request.app_name)
        if app is None or app.deleting:
            return controller_pb2.GetApplicationResponse(found=False)
        return controller_pb2.GetApplicationResponse(
            found=True,
            ingress=app.ingress,
            deployments=sorted(app.deployments),
            config_json=app.config_json,
        )

    async def WatchDeployment(
        self, requests: AsyncIterator[controller_pb2.WatchDeploymentMessage], context: Context
    ) -> AsyncIterator[controller_pb2.DeploymentUpdate]:
        first = await _first(requests, "watch", context)
        deployment_id = deployment_id_from_proto(first.watch.id)

        async def updates() -> AsyncIterator[controller_pb2.DeploymentUpdate]:
            async for replica_set in self._controller.publisher.watch(deployment_id):
                yield controller_pb2.DeploymentUpdate(replica_set=replica_set_to_proto(replica_set))

        def silent() -> None:
            logger.info("A watcher of %s went silent; closing its stream", deployment_id)

        async for update in _with_heartbeats(
            requests,
            updates(),
            controller_pb2.DeploymentUpdate(heartbeat=_HEARTBEAT),
            silent,
            f"controller:watch:{deployment_id}",
        ):
            yield update

    async def WatchRoutes(
        self, requests: AsyncIterator[controller_pb2.WatchRoutesMessage], context: Context
    ) -> AsyncIterator[controller_pb2.RoutesUpdate]:
        request = (await _first(requests, "watch", context)).watch
        info = ProxyInfo(request.node_id, request.pid, request.http_address, request.grpc_address)
        proxies = self._proxies

        async def updates() -> AsyncIterator[controller_pb2.RoutesUpdate]:
            sent = None
            while True:
                routes = self._controller.routes()
                if routes != sent:
                    sent = routes
                    table = controller_pb2.RouteTable(
                        routes=[
                            controller_pb2.Route(
                                route_prefix=r.route_prefix, app_name=r.app_name, ingress=r.ingress
                            )
                            for r in routes
                        ]
                    )
                    yield controller_pb2.RoutesUpdate(table=table)
                await self._controller.status_changed()

        def silent() -> None:
            if proxies is not None:
                proxies.silent(info)

        if proxies is not None:
            proxies.linked(info)
        try:
            async for update in _with_heartbeats(
                requests,
                updates(),
                controller_pb2.RoutesUpdate(heartbeat=_HEARTBEAT),
                silent,
                f"controller:routes:{info.node_id}:{info.pid}",
            ):
                yield update
        finally:
            if proxies is not None:
                proxies.unlinked(info)

    async def Shutdown(
        self, request: controller_pb2.ShutdownRequest, context: Context
    ) -> controller_pb2.ShutdownResponse:
        await asyncio.gather(
            *(self._controller.delete(name, wait=True) for name in list(self._controller.apps))
        )
        self._on_shutdown()
        return controller_pb2.ShutdownResponse()

    async def ReportModels(
        self, request: controller_pb2.ReportModelsRequest, context: Context
    ) -> controller_pb2.ReportModelsResponse:
        self._controller.report_models(request.replica_id, frozenset(request.model_ids))
        return controller_pb2.ReportModelsResponse()

    async def ReportLoad(
        self, request: controller_pb2.ReportLoadRequest, context: Context
    ) -> controller_pb2.ReportLoadResponse:
        self._controller.report_load(
            LoadReported(
                deployment_id_from_proto(request.id),
                request.source_id,
                request.ongoing,
                is_handle=request.is_handle,
                requests_total=request.requests_total,
                errors_total=request.errors_total,
                latency_buckets=tuple(request.latency_bucket_counts),
                latency_sum_ms=request.latency_sum_ms,
                user_metrics=tuple(user_metric_from_proto(m) for m in request.user_metrics),
                autoscaling_stats=tuple(sorted(request.autoscaling_stats.items())),
            )
        )
        return controller_pb2.ReportLoadResponse()

    async def ReportRoutingStats(
        self, request: controller_pb2.ReportRoutingStatsRequest, context: Context
    ) -> controller_pb2.ReportRoutingStatsResponse:
        stats = request.stats_json.encode()
        limit = settings().max_routing_stats_bytes
        if len(stats) > limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Routing stats of {request.replica_id} refused: {len(stats)} bytes, over the "
                f"{limit}-byte limit (SERVE_MAX_ROUTING_STATS_BYTES); report less from "
                "record_routing_stats().",
            )
        self._controller.report_routing_stats(request.replica_id, stats)
        return controller_pb2.ReportRoutingStatsResponse()

    async def Link(
        self, requests: AsyncIterator[controller_pb2.LinkMessage], context: Context
    ) -> AsyncIterator[controller_pb2.LinkResponse]:
        request = (await _first(requests, "link", context)).link
        verdict, ended = self._controller.link(
            replica_id=request.replica_id,
            address=request.address,
            pid=request.pid,
            host=request.host,
            initialized=request.initialized,
            code_version=request.code_version,
            user_config_json=request.user_config_json,
            draining=request.draining,
            gang_id=request.gang_id,
            gang_rank=request.gang_rank if request.gang_id else -1,
            gang_members=tuple(request.gang_members),
            ingress_http_address=request.ingress_http_address,
            ingress_grpc_address=request.ingress_grpc_address,
        )
        if verdict is Verdict.STOP or ended is None:
            yield controller_pb2.LinkResponse(action=controller_pb2.LinkResponse.ACTION_STOP)
            return
        link_ended = ended

        async def updates() -> AsyncIterator[controller_pb2.LinkResponse]:
            yield controller_pb2.LinkResponse(action=controller_pb2.LinkResponse.ACTION_ACCEPTED)
            await link_ended.wait()

        def silent() -> None:
            logger.warning(
                "Replica %s said nothing for %.0fs (SERVE_HEARTBEAT_TIMEOUT_S); its link is lost",
                request.replica_id,
                settings().heartbeat_timeout_s,
            )

        try:
            async for update in _with_heartbeats(
                requests,
                updates(),
                controller_pb2.LinkResponse(action=controller_pb2.LinkResponse.ACTION_HEARTBEAT),
                silent,
                f"controller:link:{request.replica_id}",
            ):
                yield update
        finally:
            self._controller.unlink(request.replica_id, ended)


_HEARTBEAT = controller_pb2.Heartbeat()
M = TypeVar("M", bound=Message)
U = TypeVar("U")


async def _first(requests: AsyncIterator[M], kind: str, context: Context) -> M:
    """A stream's first message, which must carry ``kind``; bounded by the heartbeat timeout."""
    timeout_s = settings().heartbeat_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            first = await anext(requests)
    except (TimeoutError, StopAsyncIteration):
        first = None
    if first is None or first.WhichOneof("kind") != kind:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"The first message of this stream must carry `{kind}` (within {timeout_s:g}s); "
            "then only heartbeats.",
        )
    assert first is not None
    return first


def _with_heartbeats(
    requests: AsyncIterator[object],
    updates: AsyncIterator[U],
    heartbeat: U,
    on_silent: Callable[[], None],
    name: str,
) -> AsyncIterator[U]:
    s = settings()
    return with_heartbeats(
        requests,
        updates,
        heartbeat,
        period_s=s.heartbeat_period_s,
        timeout_s=s.heartbeat_timeout_s,
        on_silent=on_silent,
        name=name,
    )
