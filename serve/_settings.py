"""Every ``SERVE_*`` environment variable, read once per process by :func:`settings`.

| variable | meaning | default |
|---|---|---|
| SERVE_ADDRESS | the controller to use instead of an embedded one | unset |
| SERVE_STATE_DIR | a standalone controller's address record, token, state and logs | ~/.serve |
| SERVE_CLUSTER_TOKEN | the cluster token (else read from the state directory) | unset |
| SERVE_LOG_LEVEL | log level of serve's own loggers | INFO |
| SERVE_LOG_FORMAT | ``text`` or ``json`` (one JSON object per line) | text |
| SERVE_ORPHAN_TIMEOUT_S | a replica or proxy without a controller this long exits | 30 |
| SERVE_HEARTBEAT_PERIOD_S | each end of a controller stream says it is alive this often | 1 |
| SERVE_HEARTBEAT_TIMEOUT_S | a stream silent this long is lost (must exceed the period) | 5 |
| SERVE_PROXY_LOCATION | the default ``proxy_location`` (the tests set ``Disabled``) | EveryNode |
| SERVE_DEFAULT_HTTP_PORT | the default ``http_options.port`` | 8000 |
| SERVE_DEFAULT_GRPC_PORT | the default ``grpc_options.port`` | 9000 |
| SERVE_HTTP_SSL_KEYFILE_PASSWORD | ``ssl_keyfile_password``, kept off command lines | unset |
| SERVE_METRICS_INTERVAL_S | how often replicas and handles report load and counters | 10 |
| SERVE_DASHBOARD_PORT | an embedded controller's dashboard port, loopback (off: none) | 0: any |
| SERVE_TLS_CERT / SERVE_TLS_KEY / SERVE_TLS_CA | PEM files: mutual TLS on all channels | unset |
| SERVE_STREAM_WINDOW_BYTES | stream bytes a replica may send ahead of its consumer | 16 MiB |
| SERVE_SHM_MIN_BYTES | buffers this big use /dev/shm within a host (0: never) | 256 KiB |
| SERVE_MAX_MESSAGE_BYTES | largest message a daemon takes: a call's arguments or result | 500 MiB |
| SERVE_MAX_CONTROL_MESSAGE_BYTES | largest request of a control call (GetStatus, ...) | 4 MiB |
| SERVE_HANDSHAKE_TIMEOUT_S | a connection still in its HTTP/2 or TLS handshake is closed | 10 |
| SERVE_IDLE_CONNECTION_TIMEOUT_S | a connection that carries no call this long is closed | 120 |
| SERVE_MAX_CONNECTIONS | incoming connections a daemon holds; more are closed on accept | fds/2 |
| SERVE_NODE_ID | this process's node (prefer-local routing, replica context) | the hostname |
| SERVE_CHOOSE_REPLICAS_TIMEOUT_S | a custom router's slower choose_replicas falls back | 10 |
| SERVE_MAX_ROUTING_STATS_BYTES | largest record_routing_stats() JSON a replica sends | 64 KiB |
| SERVE_ROTATION_MAX_BYTES | a daemon's log file is rotated at this size (0: never) | 512 MiB |
| SERVE_ROTATION_BACKUP_COUNT | rotated log files kept (0: no rotation) | 5 |
| SERVE_MAX_REQUEST_ID_LENGTH | a longer client request id is replaced by a new one | 128 |
| SERVE_TRACING_EXPORTER_IMPORT_PATH | tracing on, spans to this exporter function | unset: off |
| SERVE_TRACING_SAMPLING_RATIO | share of traces sampled at their root | 0.01 |

The HTTP proxy's bounds (see serve/_proxy/protocol.py), per proxy process:

| variable | meaning | default |
|---|---|---|
| SERVE_HTTP_MAX_HEADER_BYTES | request line plus headers; more is answered 431 | 64 KiB |
| SERVE_HTTP_MAX_HEADERS | header fields in one request; more is answered 431 | 100 |
| SERVE_HTTP_HEADER_TIMEOUT_S | a request head must be complete this long after it began | 10 |
| SERVE_HTTP_BODY_TIMEOUT_S | a request body that sends nothing this long is cut (408) | 60 |
| SERVE_HTTP_MAX_BODY_BYTES | largest request body (413 over it) | 100 MiB |
| SERVE_HTTP_BODY_BUFFER_BYTES | body read before a request is routed (or takes a slot) | 64 KiB |
| SERVE_HTTP_MAX_CONNECTIONS | connections one proxy process holds (idle ones make room) | 10,000 |
| SERVE_INGRESS_WINDOW_BYTES | body, WebSocket or response bytes in flight, unread | 1 MiB |
| SERVE_WEBSOCKET_MAX_QUEUE | WebSocket messages queued in each direction | 32 |
| SERVE_WEBSOCKET_MAX_MESSAGE_BYTES | largest WebSocket message a client may send | 16 MiB |

Direct ingress and HAProxy (Ray's RAY_SERVE_ENABLE_DIRECT_INGRESS and RAY_SERVE_ENABLE_HA_PROXY;
see replica/direct_ingress.py and serve/_proxy/haproxy.py):

| variable | meaning | default |
|---|---|---|
| SERVE_ENABLE_DIRECT_INGRESS | ingress replicas serve HTTP and gRPC on ports of their own | unset |
| SERVE_ENABLE_HA_PROXY | HAProxy on the proxy's ports, onto those replicas (implies it) | unset |
| SERVE_HAPROXY_BINARY_PATH | the haproxy executable | haproxy on PATH |
| SERVE_HAPROXY_BALANCE_ALGORITHM | HAProxy's ``balance`` for the replicas | leastconn |
| SERVE_HAPROXY_NBTHREAD | HAProxy threads | 1 |
| SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S | a stopping ingress replica stays open this long | 2 |

The two switches are also ``http_options`` fields (``direct_ingress``, ``ha_proxy``) of the
config file and ``serve.start``, and ``serve start --direct-ingress`` / ``--ha-proxy``.

Limits and connection settings are read by the daemon that receives: set them where
serve-controller runs (replicas and proxies inherit its environment) and, for the size limits,
in the driver too (it refuses an oversized call before sending it). A call over a size limit
fails alone, with an error naming the setting. A message over SERVE_MAX_MESSAGE_BYTES is refused
by gRPC's core from its length prefix, before its body is buffered. The control limit applies to
requests made only of names and numbers; it is checked once the request has arrived (bounded by
the first limit), before it is parsed. Both are at most 2 GiB - 1 (gRPC's own ceiling). A call
without the cluster token is refused from its metadata, before its body is read. A daemon raises
its open-file limit (``ulimit -n``) to the hard limit when it starts; fds/2 is half of that.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from pathlib import Path

TOKEN_METADATA_KEY = "serve-token"
REPLICA_ID_METADATA_KEY = "serve-replica-id"  # names the replica a Connect stream is for
ACKED_METADATA_KEY = "serve-acked"  # a closing Connect stream's last request read
TOKEN_ENV = "SERVE_CLUSTER_TOKEN"
ADDRESS_ENV = "SERVE_ADDRESS"
STATE_DIR_ENV = "SERVE_STATE_DIR"
NODE_ID_ENV = "SERVE_NODE_ID"
DIRECT_INGRESS_ENV = "SERVE_ENABLE_DIRECT_INGRESS"
HA_PROXY_ENV = "SERVE_ENABLE_HA_PROXY"
# The controller's proxy options (serve-proxy's flags, as JSON), for ingress replicas serving
# HTTP themselves: set by the controller in its own environment, which replicas inherit.
INGRESS_FLAGS_ENV = "_SERVE_INGRESS_FLAGS"
_GRPC_MAX = 2**31 - 1  # gRPC's message limits are C ints: at most 2 GiB - 1


@dataclasses.dataclass(frozen=True)
class Settings:
    address: str | None
    state_dir: Path
    token: str | None
    log_level: str
    log_format: str
    orphan_timeout_s: float
    metrics_interval_s: float
    dashboard_port: int | None
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    stream_window_bytes: int
    max_message_bytes: int
    max_control_message_bytes: int
    handshake_timeout_s: float
    idle_connection_timeout_s: float
    max_connections: int | None
    proxy_location: str  # the default proxy_location (Ray's default: EveryNode)
    heartbeat_period_s: float
    heartbeat_timeout_s: float
    node_id: str
    rotation_max_bytes: int
    rotation_backup_count: int
    max_request_id_length: int
    http_max_header_bytes: int
    http_max_headers: int
    http_header_timeout_s: float
    http_body_timeout_s: float
    http_max_body_bytes: int
    http_body_buffer_bytes: int
    http_max_connections: int
    ingress_window_bytes: int
    websocket_max_queue: int
    websocket_max_message_bytes: int
    choose_replicas_timeout_s: float = 10.0
    max_routing_stats_bytes: int = 64 * 2**10
    tracing_exporter_import_path: str = ""  # empty: tracing off
    tracing_sampling_ratio: float = 0.01  # Ray's default
    # A frame's out-of-band buffers of at least this many bytes in all go through shared memory
    # when both ends of its stream share /dev/shm (serve/_rpc/shm.py); 0: never. Measured: from
    # 256 KiB up (where buffers go out of band at all) a segment beats the gRPC messages.
    shm_min_bytes: int = 256 * 2**10
    direct_ingress: bool = False
    ha_proxy: bool = False
    haproxy_binary: str = "haproxy"
    haproxy_balance: str = "leastconn"
    haproxy_nbthread: int = 1
    direct_ingress_min_draining_period_s: float = 2.0


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number.") from exc


def _positive_int_env(name: str, maximum: int = 2**63 - 1) -> int | None:
    """A whole number from 1 to ``maximum``, or None when unset."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a whole number.") from exc
    if not 0 < value <= maximum:
        raise ValueError(f"{name}={raw!r} must be between 1 and {maximum}.")
    return value


def _count_env(name: str, default: int) -> int:
    """A whole number from 0 up."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a whole number.") from exc
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be 0 or more.")
    return value


def _port_or_off_env(name: str, default: int) -> int | None:
    """A TCP port (0: a free one), or None for ``off``."""
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    if raw.lower() == "off":
        return None
    if not raw.isdigit() or int(raw) > 65535:
        raise ValueError(f"{name}={raw!r}: use a port from 0 (a free one) to 65535, or off.")
    return int(raw)


def _flag_env(name: str) -> bool:
    """``1`` (on) or ``0`` (off, the default), as Ray's feature flags."""
    raw = os.environ.get(name, "").strip()
    if raw in ("", "0"):
        return False
    if raw == "1":
        return True
    raise ValueError(f"{name}={raw!r}: use 1 (on) or 0 (off).")


# HAProxy's algorithms that its runtime API can add servers to (power of two choices is
# random(2)); see the README's "Direct ingress behind HAProxy" for the measurement.
HAPROXY_BALANCE_ALGORITHMS = ("leastconn", "random(2)", "roundrobin", "random")


def _ratio_env(name: str, default: float) -> float:
    value = _float_env(name, default)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} must be between 0.0 and 1.0.")
    return value


def _non_negative_float_env(name: str, default: float) -> float:
    value = _float_env(name, default)
    if not value >= 0:
        raise ValueError(f"{name}={value!r} must be 0 or more.")
    return value


def _positive_float_env(name: str, default: float) -> float:
    value = _float_env(name, default)
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be greater than 0.")
    return value


@functools.cache
def settings() -> Settings:
    """The process's settings, read from the environment the first time they are needed."""
    state_dir = os.environ.get(STATE_DIR_ENV) or str(Path.home() / ".serve")
    log_format = os.environ.get("SERVE_LOG_FORMAT", "text").lower()
    heartbeat_period_s = _positive_float_env("SERVE_HEARTBEAT_PERIOD_S", 1.0)
    heartbeat_timeout_s = _positive_float_env("SERVE_HEARTBEAT_TIMEOUT_S", 5.0)
    if heartbeat_timeout_s <= heartbeat_period_s:
        raise ValueError(
            f"SERVE_HEARTBEAT_TIMEOUT_S={heartbeat_timeout_s:g} must be greater than "
            f"SERVE_HEARTBEAT_PERIOD_S={heartbeat_period_s:g} (a few periods: one late "
            "heartbeat must not end a stream)."
        )
    ha_proxy = _flag_env(HA_PROXY_ENV)
    balance = os.environ.get("SERVE_HAPROXY_BALANCE_ALGORITHM") or "leastconn"
    if balance not in HAPROXY_BALANCE_ALGORITHMS:
        raise ValueError(
            f"SERVE_HAPROXY_BALANCE_ALGORITHM={balance!r}: use one of "
            f"{', '.join(HAPROXY_BALANCE_ALGORITHMS)}."
        )
    if log_format not in ("text", "json"):
        raise ValueError(f"SERVE_LOG_FORMAT={log_format!r}: use 'text' or 'json'.")
    return Settings(
        address=os.environ.get(ADDRESS_ENV) or None,
        state_dir=Path(state_dir).expanduser(),
        token=os.environ.get(TOKEN_ENV) or None,
        log_level=os.environ.get("SERVE_LOG_LEVEL", "INFO").upper(),
        log_format=log_format,
        orphan_timeout_s=_float_env("SERVE_ORPHAN_TIMEOUT_S", 30.0),
        metrics_interval_s=_float_env("SERVE_METRICS_INTERVAL_S", 10.0),
        dashboard_port=_port_or_off_env("SERVE_DASHBOARD_PORT", 0),
        tls_cert=os.environ.get("SERVE_TLS_CERT") or None,
        tls_key=os.environ.get("SERVE_TLS_KEY") or None,
        tls_ca=os.environ.get("SERVE_TLS_CA") or None,
        stream_window_bytes=_positive_int_env("SERVE_STREAM_WINDOW_BYTES") or 16 * 2**20,
        # Ray's default max_grpc_message_size, which also caps a runtime_env package.
        max_message_bytes=_positive_int_env("SERVE_MAX_MESSAGE_BYTES", _GRPC_MAX) or 500 * 2**20,
        max_control_message_bytes=(
            _positive_int_env("SERVE_MAX_CONTROL_MESSAGE_BYTES", _GRPC_MAX) or 4 * 2**20
        ),
        handshake_timeout_s=_positive_float_env("SERVE_HANDSHAKE_TIMEOUT_S", 10.0),
        proxy_location=os.environ.get("SERVE_PROXY_LOCATION") or "EveryNode",
        heartbeat_period_s=heartbeat_period_s,
        heartbeat_timeout_s=heartbeat_timeout_s,
        idle_connection_timeout_s=_positive_float_env("SERVE_IDLE_CONNECTION_TIMEOUT_S", 120.0),
        max_connections=_positive_int_env("SERVE_MAX_CONNECTIONS"),
        # A cluster launcher sets it (Slurm: the node's name), since hosts may share a hostname.
        node_id=os.environ.get(NODE_ID_ENV) or socket.gethostname(),
        rotation_max_bytes=_positive_int_env("SERVE_ROTATION_MAX_BYTES") or 512 * 2**20,
        rotation_backup_count=_count_env("SERVE_ROTATION_BACKUP_COUNT", 5),
        max_request_id_length=_positive_int_env("SERVE_MAX_REQUEST_ID_LENGTH") or 128,
        # Envoy's 60 KiB, rounded; nginx allows 4 x 8 KiB, h11 16 KiB.
        http_max_header_bytes=_positive_int_env("SERVE_HTTP_MAX_HEADER_BYTES") or 64 * 2**10,
        http_max_headers=_positive_int_env("SERVE_HTTP_MAX_HEADERS") or 100,  # Envoy's default
        http_header_timeout_s=_positive_float_env("SERVE_HTTP_HEADER_TIMEOUT_S", 10.0),
        http_body_timeout_s=_positive_float_env("SERVE_HTTP_BODY_TIMEOUT_S", 60.0),  # nginx's
        http_max_body_bytes=_positive_int_env("SERVE_HTTP_MAX_BODY_BYTES") or 100 * 2**20,
        http_body_buffer_bytes=_positive_int_env("SERVE_HTTP_BODY_BUFFER_BYTES") or 64 * 2**10,
        http_max_connections=_positive_int_env("SERVE_HTTP_MAX_CONNECTIONS") or 10_000,
        ingress_window_bytes=_positive_int_env("SERVE_INGRESS_WINDOW_BYTES") or 2**20,
        websocket_max_queue=_positive_int_env("SERVE_WEBSOCKET_MAX_QUEUE") or 32,  # uvicorn's
        websocket_max_message_bytes=(
            _positive_int_env("SERVE_WEBSOCKET_MAX_MESSAGE_BYTES") or 16 * 2**20  # uvicorn's
        ),
        choose_replicas_timeout_s=_positive_float_env("SERVE_CHOOSE_REPLICAS_TIMEOUT_S", 10.0),
        max_routing_stats_bytes=(
            _positive_int_env("SERVE_MAX_ROUTING_STATS_BYTES", _GRPC_MAX) or 64 * 2**10
        ),
        tracing_exporter_import_path=os.environ.get("SERVE_TRACING_EXPORTER_IMPORT_PATH", ""),
        tracing_sampling_ratio=_ratio_env("SERVE_TRACING_SAMPLING_RATIO", 0.01),
        shm_min_bytes=_count_env("SERVE_SHM_MIN_BYTES", 256 * 2**10),
        # As Ray's: HAProxy needs the replicas to serve HTTP themselves.
        direct_ingress=ha_proxy or _flag_env(DIRECT_INGRESS_ENV),
        ha_proxy=ha_proxy,
        haproxy_binary=os.environ.get("SERVE_HAPROXY_BINARY_PATH") or "haproxy",
        haproxy_balance=balance,
        haproxy_nbthread=_positive_int_env("SERVE_HAPROXY_NBTHREAD", 64) or 1,
        direct_ingress_min_draining_period_s=_non_negative_float_env(
            "SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", 2.0
        ),
    )
