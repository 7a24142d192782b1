"""Every ``SERVE_*`` environment variable, read once per process by :func:`settings`.

| variable | meaning | default |
|---|---|---|
| SERVE_ADDRESS | controller to use instead of starting an embedded one | unset |
| SERVE_STATE_DIR | where a standalone controller records itself, its token and state | ~/.serve |
| SERVE_CLUSTER_TOKEN | the cluster token (else read from the state directory) | unset |
| SERVE_LOG_LEVEL | log level of serve's own loggers | INFO |
| SERVE_LOG_FORMAT | ``text`` or ``json`` | text |
| SERVE_ORPHAN_TIMEOUT_S | a replica with no controller for this long exits | 30 |
| SERVE_METRICS_INTERVAL_S | how often replicas and handles report load and counters | 10 |
| SERVE_TLS_CERT / SERVE_TLS_KEY / SERVE_TLS_CA | PEM files: enable TLS on every channel | unset |
| SERVE_STREAM_WINDOW_BYTES | stream bytes a replica may send ahead of its consumer | 16 MiB |
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

TOKEN_METADATA_KEY = "serve-token"
REPLICA_ID_METADATA_KEY = "serve-replica-id"  # names the replica a Connect stream is for
ACKED_METADATA_KEY = "serve-acked"  # a closing Connect stream's last request read
TOKEN_ENV = "SERVE_CLUSTER_TOKEN"
ADDRESS_ENV = "SERVE_ADDRESS"
STATE_DIR_ENV = "SERVE_STATE_DIR"


@dataclasses.dataclass(frozen=True)
class Settings:
    address: str | None
    state_dir: Path
    token: str | None
    log_level: str
    log_format: str
    orphan_timeout_s: float
    metrics_interval_s: float
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    stream_window_bytes: int


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number.") from exc


def _positive_int_env(name: str, default: int) -> int:
    value = _float_env(name, default)
    if value < 1 or value != int(value):
        raise ValueError(f"{name}={value!r} must be a positive whole number.")
    return int(value)


@functools.cache
def settings() -> Settings:
    """The process's settings, read from the environment the first time they are needed."""
    state_dir = os.environ.get(STATE_DIR_ENV) or str(Path.home() / ".serve")
    log_format = os.environ.get("SERVE_LOG_FORMAT", "text").lower()
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
        tls_cert=os.environ.get("SERVE_TLS_CERT") or None,
        tls_key=os.environ.get("SERVE_TLS_KEY") or None,
        tls_ca=os.environ.get("SERVE_TLS_CA") or None,
        stream_window_bytes=_positive_int_env("SERVE_STREAM_WINDOW_BYTES", 16 * 1024 * 1024),
    )
