"""A typed client of the controller service, used by drivers, handles and replicas."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from serve._models import CodeEnv, DeploymentID, DeploymentSpec, ProxyInfo, ReplicaSet, Route
from serve._proto import controller_pb2, controller_pb2_grpc
from serve._rpc.channel import CHANNEL_OPTIONS, TlsFiles, open_channel, token_metadata
from serve._rpc.convert import (
    application_status_from_proto,
    code_env_to_proto,
    deployment_id_to_proto,
    policy_to_proto,
    replica_set_from_proto,
    serve_status_from_proto,
    spec_to_proto,
    user_metric_to_proto,
)
from serve._rpc.status import controller_error, rebuild
from serve._settings import settings
from serve.config import AutoscalingPolicy
from serve.exceptions import ControllerUnavailableError, ServeError
from serve.metrics import Sample
from serve.schema import ApplicationStatusOverview, ServeStatus

# Unary control calls answer in milliseconds; a controller that takes longer is gone.
CALL_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class LinkInfo:
    """What a replica tells its controller when it links (and re-links after a restart)."""

    replica_id: str
    address: str
    pid: int
    host: str
    initialized: bool
    code_version: str
    user_config_json: bytes
    model_ids: tuple[str, ...]
    draining: bool
    gang_id: str = ""
    gang_rank: int = -1
    gang_members: tuple[str, ...] = ()  # replica ids, by rank
    ingress_http_address: str = ""  # where it serves HTTP itself (direct ingress)
    ingress_grpc_address: str = ""  # where it serves gRPC itself (direct ingress)


@dataclasses.dataclass(frozen=True)
class ReplicaLoad:
    """A replica's periodic report: average ongoing requests and cumulative counters."""

    ongoing: float
    requests_total: int
    errors_total: int
    latency_bucket_counts: tuple[int, ...]
    latency_sum_ms: float
    user_metrics: tuple[Sample, ...] = ()
    autoscaling_stats: dict[str, float] = dataclasses.field(default_factory=dict)


class ControllerClient:
    """One channel to the controller, opened on first use on the loop that uses it.

    Used by drivers (deploy, status, watch), handles (load reports) and replicas (link,
    reports): one channel per process.
    """

    def __init__(self, address: str, *, token: str | None, tls: TlsFiles | None) -> None:
        self.address = address
        self._metadata = token_metadata(token)
        self._tls = tls
        self._heartbeat_period_s = settings().heartbeat_period_s
        self._heartbeat_timeout_s = settings().heartbeat_timeout_s
        self._channel_: grpc.aio.Channel | None = None
        self._stub_: controller_pb2_grpc.ControllerAsyncStub | None = None
        self._closed = False

    @property
    def _stub(self) -> controller_pb2_grpc.ControllerAsyncStub:
        if self._stub_ is None:
            if self._closed:
                raise ServeError("This controller client was closed.")
            self._channel_ = open_channel(self.address, self._tls)
            self._stub_ = controller_pb2_grpc.ControllerStub(self._channel_)
        return self._stub_

    async def aclose(self) -> None:
        """Close the channel. Idempotent."""
        self._closed = True
        channel, self._channel_, self._stub_ = self._channel_, None, None
        if channel is not None:
            await channel.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Fail fast (within ``timeout_s``) if nothing answers at the address."""
        try:
            await self._stub.GetStatus(
                controller_pb2.GetStatusRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, "reach the controller") from exc

    async def deploy(
        self,
        *,
        app_name: str,
        route_prefix: str | None,
        ingress: str,
        specs: Sequence[DeploymentSpec],
        code_env: CodeEnv,
        config_json: str = "",
        autoscaling_policy: AutoscalingPolicy | None = None,
    ) -> None:
        request = controller_pb2.DeployRequest(
            app_name=app_name,
            ingress=ingress,
            deployments=[spec_to_proto(s) for s in specs],
            code_env=code_env_to_proto(code_env),
            config_json=config_json,
        )
        if autoscaling_policy is not None:
            request.autoscaling_policy.CopyFrom(policy_to_proto(autoscaling_policy))
        if route_prefix is not None:
            request.route_prefix = route_prefix
        try:
            await self._stub.Deploy(request, timeout=CALL_TIMEOUT_S, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, f"deploy application {app_name!r}") from exc

    async def wait_application(
        self, app_name: str, timeout_s: float
    ) -> tuple[ApplicationStatusOverview, int] | None:
        """(status, ingress replica-set version) once the application settles or ``timeout_s``
        passes; None if there is no such application."""
        try:
            reply = await self._stub.WaitApplication(
                controller_pb2.WaitApplicationRequest(app_name=app_name, timeout_s=timeout_s),
                timeout=timeout_s + CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, f"wait for application {app_name!r}") from exc
        if not reply.found:
            return None
        return application_status_from_proto(reply.status), reply.ingress_set_version

    async def failure_cause(self, app_name: str) -> BaseException | None:
        """The exception of the application's last constructor failure, rebuilt, if any."""
        reply = await self._stub.WaitApplication(
            controller_pb2.WaitApplicationRequest(app_name=app_name, timeout_s=0),
            timeout=CALL_TIMEOUT_S,
            metadata=self._metadata,
        )
        for deployment in reply.status.deployments:
            if deployment.error.traceback or deployment.error.pickled:
                return rebuild(deployment.error)
        return None

    async def delete_application(self, app_name: str, *, wait: bool) -> bool:
        try:
            reply = await self._stub.DeleteApplication(
                controller_pb2.DeleteApplicationRequest(app_name=app_name, wait=wait),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, f"delete application {app_name!r}") from exc
        return reply.found

    async def status(self) -> ServeStatus:
        try:
            reply = await self._stub.GetStatus(
                controller_pb2.GetStatusRequest(), timeout=CALL_TIMEOUT_S, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, "get the serve status") from exc
        return serve_status_from_proto(reply)

    async def _application(self, app_name: str) -> controller_pb2.GetApplicationResponse:
        try:
            return await self._stub.GetApplication(
                controller_pb2.GetApplicationRequest(app_name=app_name),
                timeout=CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, f"look up application {app_name!r}") from exc

    async def get_application(self, app_name: str) -> tuple[str, list[str]] | None:
        """(ingress, deployment names) of an application, or None if there is none."""
        reply = await self._application(app_name)
        return (reply.ingress, list(reply.deployments)) if reply.found else None

    async def deployed_config(self, app_name: str) -> str | None:
        """The config-file section an application was deployed with ("" if it came from
        serve.run); None if there is no such application."""
        reply = await self._application(app_name)
        return reply.config_json if reply.found else None

    async def shutdown(self) -> None:
        try:
            await self._stub.Shutdown(
                controller_pb2.ShutdownRequest(), timeout=120, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # it stopped before answering
                raise controller_error(exc, self.address, "shut down serve") from exc

    async def _hold(self, method: Any, first: Any, heartbeat: Any, what: str) -> AsyncIterator[Any]:
        """Hold a long-lived stream: send ``first``, then ``heartbeat`` every heartbeat period
        (from this loop: a stuck loop goes silent); yield what the controller sends, bar its
        heartbeats. Raises ControllerUnavailableError when the stream breaks, or when nothing
        came for the heartbeat timeout (the controller is gone, or the network to it is)."""
        period_s, timeout_s = self._heartbeat_period_s, self._heartbeat_timeout_s

        async def requests() -> AsyncIterator[Any]:
            yield first
            while True:
                await asyncio.sleep(period_s)
                yield heartbeat

        call = method(requests(), metadata=self._metadata)
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout_s):
                        message = await call.read()
                except TimeoutError:
                    raise ControllerUnavailableError(
                        f"Could not {what}: the controller at {self.address} said nothing for "
                        f"{timeout_s:g}s (SERVE_HEARTBEAT_TIMEOUT_S); it, or the network to it, "
                        "is down."
                    ) from None
                if message is grpc.aio.EOF:
                    return
                if not _is_heartbeat(message):
                    yield message
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, what) from exc
        finally:
            call.cancel()

    async def watch(self, deployment_id: DeploymentID) -> AsyncIterator[ReplicaSet]:
        """Replica sets of one deployment: the current one, then each change. Ends on error
        (and on a silent controller)."""
        first = controller_pb2.WatchDeploymentMessage(
            watch=controller_pb2.WatchDeploymentRequest(id=deployment_id_to_proto(deployment_id))
        )
        heartbeat = controller_pb2.WatchDeploymentMessage(heartbeat=_HEARTBEAT)
        updates = self._hold(self._stub.WatchDeployment, first, heartbeat, f"watch {deployment_id}")
        async for update in updates:
            yield replica_set_from_proto(update.replica_set)

    async def report_handle_load(
        self, deployment_id: DeploymentID, source_id: str, queued: float, requests_total: int
    ) -> None:
        """A process's handles to one deployment: requests queued now, requests made so far."""
        try:
            await self._stub.ReportLoad(
                controller_pb2.ReportLoadRequest(
                    id=deployment_id_to_proto(deployment_id),
                    source_id=source_id,
                    ongoing=queued,
                    is_handle=True,
                    requests_total=requests_total,
                ),
                timeout=CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, "report load") from exc

    async def link(self, info: LinkInfo) -> AsyncIterator[bool]:
        """Hold a replica's Link stream: yields True while the controller keeps the replica,
        and False once if it wants it to stop. Ends when the stream breaks or falls silent
        (raises ControllerUnavailableError and the like)."""
        first = controller_pb2.LinkMessage(
            link=controller_pb2.LinkRequest(
                replica_id=info.replica_id,
                address=info.address,
                pid=info.pid,
                host=info.host,
                initialized=info.initialized,
                code_version=info.code_version,
                user_config_json=info.user_config_json,
                model_ids=list(info.model_ids),
                draining=info.draining,
                gang_id=info.gang_id,
                gang_rank=info.gang_rank,
                gang_members=list(info.gang_members),
                ingress_http_address=info.ingress_http_address,
                ingress_grpc_address=info.ingress_grpc_address,
            )
        )
        heartbeat = controller_pb2.LinkMessage(heartbeat=_HEARTBEAT)
        async for response in self._hold(
            self._stub.Link, first, heartbeat, "link to the controller"
        ):
            yield response.action != controller_pb2.LinkResponse.ACTION_STOP

    async def watch_routes(self, proxy: ProxyInfo) -> AsyncIterator[list[Route]]:
        """Hold a proxy's WatchRoutes stream: the route table at once, then each change; its
        heartbeats are how the controller knows the proxy lives. Ends when the stream breaks or
        falls silent (raises ControllerUnavailableError and the like)."""
        first = controller_pb2.WatchRoutesMessage(
            watch=controller_pb2.WatchRoutesRequest(
                node_id=proxy.node_id,
                pid=proxy.pid,
                http_address=proxy.http_address,
                grpc_address=proxy.grpc_address,
            )
        )
        heartbeat = controller_pb2.WatchRoutesMessage(heartbeat=_HEARTBEAT)
        async for update in self._hold(
            self._stub.WatchRoutes, first, heartbeat, "watch the route table"
        ):
            table = update.table
            yield [Route(r.route_prefix, r.app_name, r.ingress) for r in table.routes]

    async def report_replica_load(
        self, deployment_id: DeploymentID, replica_id: str, load: ReplicaLoad
    ) -> None:
        try:
            await self._stub.ReportLoad(
                controller_pb2.ReportLoadRequest(
                    id=deployment_id_to_proto(deployment_id),
                    source_id=replica_id,
                    ongoing=load.ongoing,
                    requests_total=load.requests_total,
                    errors_total=load.errors_total,
                    latency_bucket_counts=list(load.latency_bucket_counts),
                    latency_sum_ms=load.latency_sum_ms,
                    user_metrics=[user_metric_to_proto(m) for m in load.user_metrics],
                    autoscaling_stats=load.autoscaling_stats,
                ),
                timeout=CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, "report load") from exc

    async def report_routing_stats(self, replica_id: str, stats_json: bytes) -> None:
        try:
            await self._stub.ReportRoutingStats(
                controller_pb2.ReportRoutingStatsRequest(
                    replica_id=replica_id, stats_json=stats_json.decode()
                ),
                timeout=CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, "report routing stats") from exc

    async def report_models(self, replica_id: str, model_ids: Sequence[str]) -> None:
        try:
            await self._stub.ReportModels(
                controller_pb2.ReportModelsRequest(replica_id=replica_id, model_ids=model_ids),
                timeout=CALL_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise controller_error(exc, self.address, "report model ids") from exc


_HEARTBEAT = controller_pb2.Heartbeat()


def _is_heartbeat(message: Any) -> bool:
    if isinstance(message, controller_pb2.LinkResponse):
        return bool(message.action == controller_pb2.LinkResponse.ACTION_HEARTBEAT)
    return bool(message.WhichOneof("kind") == "heartbeat")


def lookup_application_blocking(client: object, app_name: str) -> tuple[str, list[str]] | None:
    """GetApplication with a short-lived sync channel, for callers on the home loop's thread.

    ``serve.get_app_handle`` is synchronous (as in Ray) and is often called in a deployment's
    constructor, which runs on the replica's loop; the lookup blocks that loop for one RPC.
    """
    address: str = client.address  # type: ignore[attr-defined]
    token: str | None = client.token  # type: ignore[attr-defined]
    tls: TlsFiles | None = client.tls  # type: ignore[attr-defined]
    if tls is not None:
        channel = grpc.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        stub = controller_pb2_grpc.ControllerStub(channel)
        reply = stub.GetApplication(
            controller_pb2.GetApplicationRequest(app_name=app_name),
            timeout=CALL_TIMEOUT_S,
            metadata=token_metadata(token),
        )
    except grpc.RpcError as exc:
        raise ServeError(f"Could not look up application {app_name!r}: {exc}") from exc
    finally:
        channel.close()
    if not reply.found:
        return None
    return reply.ingress, list(reply.deployments)
