"""The controller's client of one replica's control calls (Initialize, Reconfigure, ...)."""

from __future__ import annotations

import grpc
import grpc.aio

from serve._models import CodeEnv, DeploymentConfig, DeploymentSpec, Failure
from serve._proto import common_pb2, replica_pb2, replica_pb2_grpc
from serve._rpc.channel import TlsFiles, open_channel, token_metadata
from serve._rpc.convert import code_env_to_proto, config_to_proto, spec_to_proto


class ReplicaUnreachable(Exception):
    """The control call did not get an answer from the replica."""


def _failure(error: common_pb2.ErrorInfo) -> Failure:
    return Failure(
        message=f"{error.type_name}: {error.message}",
        traceback=error.traceback,
        pickled=error.pickled,
    )


class ReplicaClient:
    """A channel to one replica, opened on first use on the controller's loop."""

    def __init__(self, address: str, *, token: str | None, tls: TlsFiles | None) -> None:
        self.address = address
        self._metadata = token_metadata(token)
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._stub_: replica_pb2_grpc.ReplicaAsyncStub | None = None

    @property
    def _stub(self) -> replica_pb2_grpc.ReplicaAsyncStub:
        if self._stub_ is None:
            self._channel = open_channel(self.address, self._tls)
            self._stub_ = replica_pb2_grpc.ReplicaStub(self._channel)
        return self._stub_

    async def aclose(self) -> None:
        """Close the channel (opened on first use). Idempotent."""
        channel, self._channel, self._stub_ = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def initialize(
        self,
        app_name: str,
        spec: DeploymentSpec,
        code_env: CodeEnv,
        rank: int = -1,
        world_size: int = 0,
    ) -> Failure | None:
        """Build the user object; the constructor's failure, or None on success."""
        try:
            reply = await self._stub.Initialize(
                replica_pb2.InitializeRequest(
                    app_name=app_name,
                    spec=spec_to_proto(spec),
                    code_env=code_env_to_proto(code_env),
                    rank=rank,
                    world_size=world_size,
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise ReplicaUnreachable(f"Initialize: {exc.code().name}: {exc.details()}") from exc
        return None if reply.ok else _failure(reply.error)

    async def reconfigure(
        self, config: DeploymentConfig, *, user_config_changed: bool
    ) -> Failure | None:
        try:
            reply = await self._stub.Reconfigure(
                replica_pb2.ReconfigureRequest(
                    config=config_to_proto(config), user_config_changed=user_config_changed
                ),
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise ReplicaUnreachable(f"Reconfigure: {exc.code().name}: {exc.details()}") from exc
        return None if reply.ok else _failure(reply.error)

    async def check_health(self, timeout_s: float) -> Failure | None:
        """None if healthy; the failure if ``check_health()`` raised. Raises if unreachable."""
        try:
            reply = await self._stub.CheckHealth(
                replica_pb2.CheckHealthRequest(), timeout=timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise ReplicaUnreachable(f"CheckHealth: {exc.code().name}: {exc.details()}") from exc
        return None if reply.ok else _failure(reply.error)

    async def stop(self, timeout_s: float) -> int:
        """Drain and stop the replica; returns how many requests it abandoned."""
        try:
            reply = await self._stub.Stop(
                replica_pb2.StopRequest(timeout_s=timeout_s),
                timeout=timeout_s + 5.0,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise ReplicaUnreachable(f"Stop: {exc.code().name}: {exc.details()}") from exc
        return reply.abandoned
