"""`make bench`'s tracing rows: what tracing costs with every request sampled (1.0).

A serve session of its own with ``TracingConfig(enabled=True, sampling_ratio=1.0)`` and the
default exporter (a JSON line per span in the replicas' span files), measured like L1, C1 and
T1 (1 replica, 256 callers) and shown beside the same run's untraced figures. L1 traces the
replica's span alone (drivers do not trace, as in Ray); C1 adds the Ingress replica's
``route_to_replica`` and the Noop replica's span under it. The span files are removed after.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

import serve
from serve._settings import settings


def measure_tracing(
    s: Any,
    noop: Any,
    ingress: Any,
    *,
    latency: Callable[..., dict[str, float]],
    rate: Callable[..., Awaitable[float]],
    cpu_s: Callable[[psutil.Process], float],
) -> dict[str, Any]:
    """``noop`` and ``ingress``: the bench's deployments (bound to run here, traced)."""
    out: dict[str, Any] = {}
    serve.start(
        proxy_location="Disabled",
        tracing_config=serve.TracingConfig(enabled=True, sampling_ratio=1.0),
    )
    try:
        handle = serve.run(noop, name="traced-noop", route_prefix=None)
        replica = psutil.Process(handle.pid.remote().result())
        out["L1"] = latency(lambda: handle.remote(b"x").result(), s.latency_n, s.warmup_n)
        composed = serve.run(ingress, name="traced-compose", route_prefix=None)
        out["C1"] = latency(lambda: composed.remote(b"x").result(), s.latency_n, s.warmup_n)
        before, served_before = cpu_s(replica), handle._router.num_requests
        out["T1_c256_rps"] = asyncio.run(rate(lambda: handle.remote(b"x"), 256, s.seconds))
        served = handle._router.num_requests - served_before
        out["cpu_replica_us_per_request"] = (cpu_s(replica) - before) / served * 1e6
    finally:
        serve.shutdown()
        # The embedded controller's session (this process's): its span files, gone.
        for spans in (settings().state_dir / "logs").glob(f"session_*_{os.getpid()}/spans"):
            shutil.rmtree(spans, ignore_errors=True)
    return out


def tracing_rows(ours: dict[str, Any], traced: dict[str, Any], row: Callable[..., None]) -> None:
    """The table's rows: each traced figure, its ratio to the untraced one of this run."""
    for name in ("L1", "C1"):
        row(
            f"{name} p50, tracing 1.0 (vs untraced)",
            traced[name]["p50_us"],
            "us",
            ours[name]["p50_us"],
        )
    row(
        "T1 1 replica, 256 callers, tracing 1.0 (vs untraced)",
        traced["T1_c256_rps"],
        "req/s",
        ours["T1_r1_c256_rps"],
    )
    row(
        "CPU per request, replica, tracing 1.0 (vs untraced)",
        traced["cpu_replica_us_per_request"],
        "us",
        ours["cpu_replica_us_per_request"],
    )
