"""The table `make bench` prints: each figure beside its same-run floor (the unary or
streaming grpc.aio call, the bare multiplexed stream, bare uvicorn) and its target."""

from __future__ import annotations

from typing import Any

from scripts.bench_tracing import tracing_rows


def table(
    floor: dict[str, Any],
    ours: dict[str, Any],
    routing: dict[str, float],
    http_floor: dict[str, Any] | None = None,
    ingress: dict[str, Any] | None = None,
    traced: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(
        name: str,
        value: float,
        unit: str,
        floor_value: float | None,
        target: str = "",
        stream: float | None = None,
    ) -> None:
        """``floor_value``: the unary (or streaming) grpc.aio floor's figure; ``stream``: the
        bare multiplexed stream's (scripts/bench_stream_floor.py), where one applies."""
        ratio = value / floor_value if floor_value else None
        rows.append(
            {
                "name": name,
                "value": value,
                "unit": unit,
                "floor": floor_value,
                "ratio": ratio,
                "stream_floor": stream,
                "stream_ratio": value / stream if stream else None,
                "target": target,
            }
        )

    unary = floor["unary"]["p50_us"]
    mux = floor["mux"]
    row("floor unary echo p50", unary, "us", None)
    row("floor unary 256 callers", floor["unary_rps_256"], "req/s", None)
    row("floor stream items", floor["stream_items_per_s"], "items/s", None)
    row("floor multiplexed stream L1 p50", mux["L1"]["p50_us"], "us", unary)
    # The stream floor for throughput is its 64-caller figure (the probe's): at 256 the
    # bare stream coalesces even more per message, a figure no per-request work can follow.
    row("floor multiplexed stream, 64 callers", mux["T1_c64_rps"], "req/s", None)
    row("floor multiplexed stream, 256 callers", mux["T1_c256_rps"], "req/s", None)
    for name, target in (("L1", "<= 1.5x stream"), ("L2", ""), ("C1", "")):
        for q in ("p50", "p90", "p99"):
            row(
                f"{name} {q}",
                ours[name][f"{q}_us"],
                "us",
                floor["unary"][f"{q}_us"],
                target if q == "p50" else "",
                stream=mux["L1"][f"{q}_us"],
            )
    row(
        "L1 p50, sync method",
        ours["L1_sync"]["p50_us"],
        "us",
        unary,
        "<= 1.5x stream",
        stream=mux["L1"]["p50_us"],
    )
    row("C1 p50 / L1 p50", ours["C1"]["p50_us"] / ours["L1"]["p50_us"], "x", None, "<= 1.8")
    for replicas in (1, 2):
        for concurrency in (16, 64, 256):
            key = f"T1_r{replicas}_c{concurrency}_rps"
            target = ">= 0.3x stream" if (replicas, concurrency) == (1, 256) else ""
            row(
                f"T1 {replicas} replica(s), {concurrency} callers",
                ours[key],
                "req/s",
                floor["unary_rps_256"],
                target,
                stream=mux["T1_c64_rps"],
            )
    row(
        "T1 sync method, 256 callers",
        ours["T1_sync_c256_rps"],
        "req/s",
        floor["unary_rps_256"],
        ">= 0.25x stream",
        stream=mux["T1_c64_rps"],
    )
    row("T1 8 threads calling result()", ours["T1_threads8_rps"], "req/s", floor["unary_rps_256"])
    row(
        "T1 8 threads, sync method",
        ours["T1_sync_threads8_rps"],
        "req/s",
        floor["unary_rps_256"],
    )
    row("S1 stream items", ours["S1_items_per_s"], "items/s", floor["stream_items_per_s"], ">= 3")
    row(
        "S1 sync generator, sync for",
        ours["S1_sync_items_per_s"],
        "items/s",
        floor["stream_items_per_s"],
        ">= 1.5",
    )
    for size in (1, 10):
        row(
            f"P1 {size} MB echo p50",
            ours[f"P1_{size}mb"]["p50_us"],
            "us",
            floor[f"echo_{size}mb"]["p50_us"],
            "<= 0.5" if size == 10 else "",
        )
    for codec in ("cloudpickle", "pickle", "msgpack", "orjson"):
        row(
            f"codec {codec}: 1 MB str echo p50",
            ours[f"codec_{codec}_1mb_str"]["p50_us"],
            "us",
            floor["echo_1mb"]["p50_us"],
        )
        row(
            f"codec {codec}: stream items",
            ours[f"codec_{codec}_stream_items_per_s"],
            "items/s",
            floor["stream_items_per_s"],
        )
    row("driver crossing, result()", ours["crossing_us"]["result"], "us/request", None)
    row(
        "driver crossing, await on another loop",
        ours["crossing_us"]["await_other_loop"],
        "us/request",
        None,
    )
    row("CPU per request, caller", ours["cpu_caller_us_per_request"], "us", None, "<= 25")
    row("CPU per request, replica", ours["cpu_replica_us_per_request"], "us", None, "<= 25")
    row("CPU per request, caller, sync method", ours["cpu_caller_us_per_request_sync"], "us", None)
    row(
        "CPU per request, replica, sync method",
        ours["cpu_replica_us_per_request_sync"],
        "us",
        None,
    )
    row("memory, idle replica", ours["memory_idle_replica_mb"], "MB", None, "<= 50")
    row("memory, controller", ours["memory_controller_mb"], "MB", None)
    for name in ("replica", "controller", "driver"):
        row(
            f"memory growth, {name}, {ours['memory_growth_requests']} requests",
            ours[f"memory_growth_{name}_mb"],
            "MB",
            None,
            "< 5",
        )
    for replicas, cost in routing.items():
        row(f"routing cost, {replicas} replicas", cost, "us/request", None)
    if traced is not None:
        tracing_rows(ours, traced, row)
    if http_floor is not None and ingress is not None:
        floor_rps = http_floor["c64"]["rps"]
        floor_p50 = http_floor["c1"]["p50_us"]
        # The latency target: the floor's p50 plus 1.2x our handle L1 p50 (this run's).
        p50_target = floor_p50 + 1.2 * ours["L1"]["p50_us"]
        row("HTTP floor (uvicorn), 64 connections", floor_rps, "req/s", None)
        row("HTTP floor (uvicorn) p50, 1 connection", floor_p50, "us", None)
        for key, label in (
            ("http_async", "HTTP noop"),
            ("http_sync", "HTTP noop, sync method"),
            ("http_fastapi", "HTTP noop, FastAPI ingress"),
        ):
            if key not in ingress:
                continue
            figures = ingress[key]
            row(
                f"{label}, 64 connections",
                figures["c64"]["rps"],
                "req/s",
                floor_rps,
                ">= 0.25" if key == "http_async" else "",
            )
            row(
                f"{label} p50, 1 connection",
                figures["c1"]["p50_us"],
                "us",
                floor_p50,
                f"<= {p50_target:,.0f} us" if key == "http_async" else "",
            )
    if ingress is not None:
        row("gRPC floor (grpc.aio), 64 callers", floor["unary_rps_64"], "req/s", None)
        row(
            "gRPC ingress noop p50, 1 caller",
            ingress["grpc"]["unary"]["p50_us"],
            "us",
            floor["unary"]["p50_us"],
        )
        row(
            "gRPC ingress noop, 64 callers",
            ingress["grpc"]["unary_rps_64"],
            "req/s",
            floor["unary_rps_64"],
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'figure':<46} {'value':>12} {'unit':<11} {'vs floor':>9} {'vs stream':>9}  target")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else ""
        stream = f"{r['stream_ratio']:.2f}x" if r.get("stream_ratio") is not None else ""
        value = r["value"]
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
        print(f"{r['name']:<46} {shown:>12} {r['unit']:<11} {ratio:>9} {stream:>9}  {r['target']}")
