"""Channels, servers and the cluster token: every gRPC option in one place."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio

from serve._settings import TOKEN_METADATA_KEY, settings

_MESSAGE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *_MESSAGE_OPTIONS,
    ("grpc.enable_retries", 0),
    ("grpc.enable_http_proxy", 0),
    # Reconnect quickly after a controller restart instead of backing off for up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_MESSAGE_OPTIONS,
    ("grpc.so_reuseport", 0),
]


class TlsFiles:
    """PEM files for TLS: a certificate and key for this side, and the CA that signs peers."""

    def __init__(self, cert: str, key: str, ca: str) -> None:
        self.cert = Path(cert).read_bytes()
        self.key = Path(key).read_bytes()
        self.ca = Path(ca).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def tls_from_settings() -> TlsFiles | None:
    """TLS files from SERVE_TLS_CERT / SERVE_TLS_KEY / SERVE_TLS_CA, or None (plaintext)."""
    s = settings()
    if s.tls_cert and s.tls_key and s.tls_ca:
        return TlsFiles(s.tls_cert, s.tls_key, s.tls_ca)
    return None


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, token),) if token else ()


def open_channel(address: str, tls: TlsFiles | None = None) -> grpc.aio.Channel:
    """A channel on the running loop (grpc.aio objects never cross loops)."""
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse any call without the cluster token before its payload is decoded."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._token):
                    return await continuation(handler_call_details)
                break
        return _refuse(handler_call_details.method)


def _refuse(method: str) -> Handler:
    message = (
        f"{method}: missing or wrong cluster token; pass the token of this cluster "
        "(SERVE_CLUSTER_TOKEN or the state directory's token file)."
    )

    async def abort_unary(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Raw bytes in and out: nothing is deserialized for a refused call.
    if method.endswith("/Connect"):
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if method.endswith(("/WatchDeployment", "/Link")):
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort_unary)


def new_server(
    token: str | None, tls: TlsFiles | None, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on the running loop, bound to host:port (0 = ephemeral)."""
    interceptors: Sequence[grpc.aio.ServerInterceptor] = [TokenInterceptor(token)] if token else []
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"Could not bind a gRPC server to {address}.")
    return server, bound
