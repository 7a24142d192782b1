"""Channels, servers and the cluster token: every gRPC option in one place."""

from __future__ import annotations

import hmac
import resource
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import grpc.aio

from serve._settings import TOKEN_METADATA_KEY, settings

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # What a client sends is bounded by the server it talks to (server_options below).
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),
    ("grpc.enable_http_proxy", 0),
    # Reconnect quickly after a controller restart instead of backing off for up to 2 minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

# At most this share of the process's file descriptors go to incoming connections; the rest
# stay for what a daemon opens itself (replica pipes and channels, logs, the state store).
_CONNECTION_FD_SHARE = 0.5
_MAX_INT32 = 2**31 - 1  # gRPC's integer channel arguments


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now.

    The distribution default (often 1024) is what a connection flood exhausts first; the hard
    limit is what the operator allows, so a daemon takes all of it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep the soft limit; the connection cap follows it
    return _MAX_INT32 if soft == resource.RLIM_INFINITY else soft


def _ms(seconds: float) -> int:
    return int(min(seconds * 1000, _MAX_INT32))  # about 24 days at most (inf too): "never"


def fd_connection_share(open_file_limit: int) -> int:
    """The incoming connections this many file descriptors can afford (half of them)."""
    return min(max(16, int(open_file_limit * _CONNECTION_FD_SHARE)), _MAX_INT32)


def connection_cap(open_file_limit: int) -> int:
    """The incoming connections a gRPC daemon holds: SERVE_MAX_CONNECTIONS, else half its fds."""
    return min(settings().max_connections or fd_connection_share(open_file_limit), _MAX_INT32)


def server_options(open_file_limit: int) -> list[tuple[str, Any]]:
    """Options of a daemon's gRPC server: every bound that protects it from its network.

    The message limit is enforced by gRPC's core from the length prefix, so a bigger message
    is refused with RESOURCE_EXHAUSTED before its body is buffered. The handshake timeout
    closes a connection that has not sent its HTTP/2 preface and SETTINGS (or finished TLS)
    in time; the idle timeout closes one that carries no call; the connection cap keeps a
    flood from taking the file descriptors the daemon needs (connections over it are closed
    on accept instead of failing every accept with EMFILE).
    """
    s = settings()
    return [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.server_handshake_timeout_ms", _ms(s.handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", _ms(s.idle_connection_timeout_s)),
        ("grpc.max_allowed_incoming_connections", connection_cap(open_file_limit)),
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
    """Refuse any call without the cluster token from its metadata, before its body is read."""

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

    async def abort(request_iterator: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # Whatever the method's real shape: grpc.aio receives a unary request in full before it
    # calls a unary handler, but leaves a streaming request unread. The refusal goes out at
    # once and gRPC resets the stream, so the unread body never grows past the HTTP/2 window.
    return grpc.stream_stream_rpc_method_handler(abort)


def new_server(
    token: str | None, tls: TlsFiles | None, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server on the running loop, bound to host:port (0 = ephemeral)."""
    interceptors: Sequence[grpc.aio.ServerInterceptor] = [TokenInterceptor(token)] if token else []
    # A daemon makes its server once, at start: the fd limit is raised before the connection
    # cap is derived from it.
    options = server_options(raise_open_file_limit())
    server = grpc.aio.server(interceptors=interceptors, options=options)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, tls.server_credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"Could not bind a gRPC server to {address}.")
    return server, bound
