"""`make bench`: serve's figures beside the raw grpc.aio floor, measured in the same run.

The machine is shared and noisy, so only same-run ratios mean anything. Prints one table and
writes bench/results.json (``--out``). ``--quick`` shortens every measurement.

Ingress (scripts/bench_ingress.py): HTTP through serve-proxy beside a bare uvicorn floor, both
loaded by ``wrk`` (skipped, with one line, when wrk is missing), and gRPC through the proxy beside
the grpc.aio floor. ``--no-ingress`` leaves them out. Then (scripts/bench_fast_ingress.py)
direct ingress behind HAProxy against the default proxy, bare uvicorn and the FastAPI app on
uvicorn alone, in interleaved rounds (3; ``--quick``: 1), and HAProxy's balance algorithms.
Each round ends with the peers (scripts/bench_peers.py: Ray Serve 2.60 with its default proxy
and its HAProxy mode, LitServe, BentoML; from .venv-peers, made once by `make bench`), about
a minute a round; ``--no-peers`` leaves them out.

Tracing (scripts/bench_tracing.py): L1, C1 and T1 again with every request traced (sampling
1.0, the default exporter), beside this run's untraced figures. ``--no-tracing`` leaves it out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import psutil
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import serve  # noqa: E402
from scripts.bench_fast_ingress import fast_ingress_rows, measure_fast_ingress  # noqa: E402
from scripts.bench_ingress import have_wrk, measure_http_floor, measure_ingress  # noqa: E402
from scripts.bench_peers import (  # noqa: E402
    available_peers,
    measure_peers_round,
    peer_rows,
    peers_table,
    summarize_peers,
)
from scripts.bench_profile import measure_profile, print_profile  # noqa: E402
from scripts.bench_routing import routing_cost_us  # noqa: E402
from scripts.bench_stream_floor import measure_stream_floor  # noqa: E402
from scripts.bench_table import print_table, table  # noqa: E402
from scripts.bench_tracing import measure_tracing  # noqa: E402
from serve import _client  # noqa: E402

MB = 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class Settings:
    def __init__(self, quick: bool) -> None:
        scale = 0.3 if quick else 1.0
        self.latency_n = int(2000 * scale)
        self.warmup_n = int(300 * scale)
        self.seconds = 3.0 * scale
        self.payload_n = max(5, int(30 * scale))
        self.stream_items = int(20000 * scale)
        self.memory_requests = int(100_000 * scale)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return {"p50_us": pick(0.5), "p90_us": pick(0.9), "p99_us": pick(0.99)}


async def closed_loop(
    call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float
) -> float:
    """Requests per second from ``concurrency`` callers each sending one after another."""
    stop_at = time.perf_counter() + seconds
    counts = [0] * concurrency

    async def worker(i: int) -> None:
        while time.perf_counter() < stop_at:
            await call()
            counts[i] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (time.perf_counter() - started)


# --- the floor ---------------------------------------------------------------------------------


def measure_floor(s: Settings) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench_floor_server.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return uvloop.run(_floor_client(port, s))
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


async def _floor_client(port: int, s: Settings) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        echo = channel.unary_unary("/floor.Floor/Echo")
        stream = channel.unary_stream("/floor.Floor/Stream")
        out: dict[str, Any] = {}
        out["unary"] = await async_latency(lambda: echo(b"x"), s.latency_n, s.warmup_n)
        out["unary_rps_256"] = await closed_loop(lambda: echo(b"x"), 256, s.seconds)
        out["unary_rps_64"] = await closed_loop(lambda: echo(b"x"), 64, s.seconds)
        for size in (1, 10):
            payload = b"x" * (size * MB)
            out[f"echo_{size}mb"] = await async_latency(lambda p=payload: echo(p), s.payload_n, 1)
        request = struct.pack("<I", s.stream_items) + b"x"
        t = time.perf_counter()
        count = 0
        async for _ in stream(request):
            count += 1
        out["stream_items_per_s"] = count / (time.perf_counter() - t)
        out["mux"] = await measure_stream_floor(channel, s, latency=async_latency, rate=closed_loop)
        return out


# --- serve -------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1000)
class Noop:
    async def __call__(self, value: Any = None) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    async def items(self, count: int, item: Any) -> Any:
        for _ in range(count):
            yield item


@serve.deployment(max_ongoing_requests=1000)
class SyncNoop:
    """What most users write: plain sync methods (run on the replica's worker threads)."""

    def __call__(self, value: Any = None) -> Any:
        return value

    def pid(self) -> int:
        return os.getpid()

    def items(self, count: int, item: Any) -> Any:
        for _ in range(count):
            yield item


@serve.deployment(max_ongoing_requests=1000)
class Caller:
    """Measures handle latency from inside a deployment (Ray's handle_noop_latency topology)."""

    def __init__(self, noop: Any) -> None:
        self._noop = noop

    async def measure(self, n: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            await self._noop.remote(b"x")
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            await self._noop.remote(b"x")
            samples.append(time.perf_counter() - t)
        return samples


@serve.deployment(max_ongoing_requests=1000)
class Ingress:
    def __init__(self, downstream: Any) -> None:
        self._downstream = downstream

    async def __call__(self, value: Any) -> Any:
        return await self._downstream.remote(value)


def sync_latency(call: Callable[[], Any], n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


async def async_latency(
    call: Callable[[], Awaitable[Any]], n: int, warmup: int
) -> dict[str, float]:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t)
    return percentiles(samples)


def threaded_rate(handle: Any, threads: int, seconds: float) -> float:
    """Requests per second from plain threads each calling ``result()`` in a loop (what a
    Flask or Django app does)."""
    import threading

    stop_at = time.perf_counter() + seconds
    counts = [0] * threads

    def work(i: int) -> None:
        while time.perf_counter() < stop_at:
            handle.remote(b"x").result()
            counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - started)


def crossing_us(n: int) -> dict[str, float]:
    """The driver's hop between a caller and the IO loop and back, alone: a callable posted to
    the home loop completes a Completion the caller waits on (``result()``) or awaits from its
    own loop. Every request from a driver pays one such round trip."""
    from serve._sync import Completion, home_loop, post

    home_loop()

    def sync_once() -> None:
        done = Completion()
        post(done.set_result, None)
        done.wait_sync(None)

    async def async_once() -> None:
        done = Completion()
        post(done.set_result, None)
        await done.wait()

    async def async_many(count: int) -> float:
        for _ in range(count // 10):
            await async_once()
        started = time.perf_counter()
        for _ in range(count):
            await async_once()
        return (time.perf_counter() - started) / count * 1e6

    for _ in range(n // 10):
        sync_once()
    started = time.perf_counter()
    for _ in range(n):
        sync_once()
    sync_us = (time.perf_counter() - started) / n * 1e6
    return {"result": sync_us, "await_other_loop": uvloop.run(async_many(n))}


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / MB


def measure_serve(s: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Handles only: no proxy process beside the replicas, and no bind of port 8000 (this machine
    # is shared). The ingress figures run in a serve session of their own, with a proxy.
    serve.start(proxy_location="Disabled")
    noop = serve.run(Noop.bind(), name="noop", route_prefix=None)
    replica = psutil.Process(noop.pid.remote().result())
    client = _client.current()
    assert client is not None
    assert client.owner is not None
    controller = psutil.Process(client.owner.process.pid)
    me = psutil.Process()
    time.sleep(1.0)
    out["memory_idle_replica_mb"] = rss_mb(replica)
    out["memory_controller_mb"] = rss_mb(controller)

    out["L1"] = sync_latency(lambda: noop.remote(b"x").result(), s.latency_n, s.warmup_n)
    caller = serve.run(Caller.bind(Noop.bind()), name="caller", route_prefix=None)
    out["L2"] = percentiles(caller.measure.remote(s.latency_n, s.warmup_n).result())
    ingress = serve.run(Ingress.bind(Noop.bind()), name="compose", route_prefix=None)
    out["C1"] = sync_latency(lambda: ingress.remote(b"x").result(), s.latency_n, s.warmup_n)

    async def throughput(handle: Any, concurrency: int) -> float:
        return await closed_loop(lambda: handle.remote(b"x"), concurrency, s.seconds)

    for replicas in (1, 2):
        handle = (
            noop
            if replicas == 1
            else serve.run(Noop.options(num_replicas=2).bind(), name="noop2", route_prefix=None)
        )
        for concurrency in (16, 64, 256):
            if replicas == 1 and concurrency == 256:
                before_me, before_replica = cpu_s(me), cpu_s(replica)
                served_before = noop._router.num_requests
            rps = asyncio.run(throughput(handle, concurrency))
            out[f"T1_r{replicas}_c{concurrency}_rps"] = rps
            if replicas == 1 and concurrency == 256:
                served = noop._router.num_requests - served_before
                out["cpu_caller_us_per_request"] = (cpu_s(me) - before_me) / served * 1e6
                out["cpu_replica_us_per_request"] = (cpu_s(replica) - before_replica) / served * 1e6

    out["crossing_us"] = crossing_us(s.latency_n * 5)

    # Sync user code, driven the way programs drive it.
    sync_noop = serve.run(SyncNoop.bind(), name="sync-noop", route_prefix=None)
    sync_replica = psutil.Process(sync_noop.pid.remote().result())
    out["L1_sync"] = sync_latency(lambda: sync_noop.remote(b"x").result(), s.latency_n, s.warmup_n)
    before_me, before_replica = cpu_s(me), cpu_s(sync_replica)
    served_before = sync_noop._router.num_requests
    out["T1_sync_c256_rps"] = asyncio.run(throughput(sync_noop, 256))
    served = sync_noop._router.num_requests - served_before
    out["cpu_caller_us_per_request_sync"] = (cpu_s(me) - before_me) / served * 1e6
    out["cpu_replica_us_per_request_sync"] = (cpu_s(sync_replica) - before_replica) / served * 1e6
    out["T1_sync_threads8_rps"] = threaded_rate(sync_noop, 8, s.seconds)
    out["T1_threads8_rps"] = threaded_rate(noop, 8, s.seconds)
    t = time.perf_counter()
    count = sum(1 for _ in sync_noop.options(stream=True).items.remote(s.stream_items, b"x"))
    assert count == s.stream_items
    out["S1_sync_items_per_s"] = count / (time.perf_counter() - t)

    async def stream_rate(handle: Any, item: Any) -> float:
        t = time.perf_counter()
        count = 0
        async for _ in handle.options(stream=True).items.remote(s.stream_items, item):
            count += 1
        assert count == s.stream_items
        return count / (time.perf_counter() - t)

    out["S1_items_per_s"] = asyncio.run(stream_rate(noop, b"x"))
    for size in (1, 10):
        payload = b"x" * (size * MB)
        out[f"P1_{size}mb"] = sync_latency(
            lambda p=payload: noop.remote(p).result(), s.payload_n, 1
        )

    text = "x" * MB
    for codec in ("cloudpickle", "pickle", "msgpack", "orjson"):
        handle = noop.options(request_serialization=codec, response_serialization=codec)
        out[f"codec_{codec}_1mb_str"] = sync_latency(
            lambda h=handle: h.remote(text).result(), s.payload_n, 1
        )
        out[f"codec_{codec}_stream_items_per_s"] = asyncio.run(stream_rate(handle, {"i": 1}))

    async def many(handle: Any, total: int) -> None:
        sent = 0

        async def worker() -> None:
            nonlocal sent
            while sent < total:
                sent += 1
                await handle.remote(b"x")

        await asyncio.gather(*(worker() for _ in range(64)))

    asyncio.run(many(noop, 20_000))  # warm every pool and cache first
    before = {"replica": rss_mb(replica), "controller": rss_mb(controller), "driver": rss_mb(me)}
    asyncio.run(many(noop, s.memory_requests))
    time.sleep(0.5)
    after = {"replica": rss_mb(replica), "controller": rss_mb(controller), "driver": rss_mb(me)}
    for name in before:
        out[f"memory_growth_{name}_mb"] = after[name] - before[name]
    out["memory_growth_requests"] = s.memory_requests
    serve.shutdown()
    return out


# --- report ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--no-ingress", action="store_true", help="skip the HTTP/gRPC ingress")
    parser.add_argument("--no-tracing", action="store_true", help="skip the tracing rows")
    parser.add_argument(
        "--no-peers",
        action="store_true",
        help="skip Ray Serve, LitServe and BentoML (about a minute a fast-ingress round)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only the per-stage CPU table: T1 under py-spy (scripts/bench_profile.py)",
    )
    args = parser.parse_args()
    if args.profile:
        profile = measure_profile(
            {"async": Noop.bind(), "sync": SyncNoop.bind()},
            4.0 if args.quick else 10.0,
            rate=closed_loop,
        )
        print_profile(profile)
        out = Path(args.out).with_name("profile.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(profile, indent=2))
        print(f"\nresults in {out}")
        return
    # Measured with the defaults (INFO, one access line per request in the replica's log).
    s = Settings(args.quick)
    started = time.monotonic()
    floor = measure_floor(s)
    routing = {str(n): routing_cost_us(n, 20_000 if args.quick else 50_000) for n in (1, 8, 64)}
    try:
        ours = measure_serve(s)
    finally:
        serve.shutdown()  # also on error: no controller or replica outlives the bench
    traced = None
    if not args.no_tracing:
        traced = measure_tracing(
            s,
            Noop.bind(),
            Ingress.bind(Noop.bind()),
            latency=sync_latency,
            rate=closed_loop,
            cpu_s=cpu_s,
        )
    http_floor = ingress = fast = None
    if not args.no_ingress:
        http = have_wrk()
        http_floor = measure_http_floor(s.seconds) if http else None
        ingress = measure_ingress(
            s.seconds,
            s.latency_n,
            s.warmup_n,
            latency=async_latency,
            rate=closed_loop,
            http=http,
        )
        if http:  # direct ingress behind HAProxy against the default proxy, in rounds
            peers = [] if args.no_peers else available_peers()
            fast = measure_fast_ingress(
                s.seconds,
                1 if args.quick else 3,
                (lambda seconds: measure_peers_round(peers, seconds)) if peers else None,
            )
            fast["peers"] = summarize_peers(fast["peer_runs"], fast["runs"]["floor"])
    rows = table(floor, ours, routing, http_floor, ingress, traced)
    rows += fast_ingress_rows(fast) + peer_rows(fast) if fast else []
    print_table(rows)
    if fast and fast["peer_runs"]:
        print(f"\nHTTP noop, {fast['rounds']} interleaved rounds (medians)")
        print("\n".join(peers_table(fast)))
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"peers: {fast['peers_s']:.0f}s of this run (--no-peers leaves them out); ", end="")
        print(f"load average now {load}")
    http_runs = {"http_floor": http_floor or {}}
    http_runs.update((k, v) for k, v in (ingress or {}).items() if k.startswith("http_"))
    for key, figures in http_runs.items():
        for load, run in figures.items():
            if run["errors"]:
                print(f"warning: {key} {load}: {run['errors']} of {run['requests']} failed")
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": time.monotonic() - started,
        "floor": floor,
        "serve": ours,
        "routing_us": routing,
        "http_floor": http_floor,
        # The target for the HTTP noop p50 at 1 connection (us).
        "http_p50_target_us": (
            http_floor["c1"]["p50_us"] + 1.2 * ours["L1"]["p50_us"] if http_floor else None
        ),
        "ingress": ingress,
        "fast_ingress": fast,
        "tracing": traced,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{time.monotonic() - started:.0f}s; results in {args.out}")


if __name__ == "__main__":
    main()
