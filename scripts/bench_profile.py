"""`make bench BENCH_ARGS=--profile`: where a request's CPU goes, stage by stage, per side.

Runs T1 (one replica, 256 closed-loop callers on an asyncio loop of the driver's main thread,
as the bench does) on an async and a sync noop while py-spy samples the driver and the replica
(``--gil``: only the thread holding the GIL, so a sample is Python-side CPU; ``--nonblocking``,
so the sampled process is not paused). Each sample is attributed to the first stage, from the
innermost frame out, whose rule matches; a stage's microseconds per request are its samples
over the sampling rate over the requests served meanwhile. What the process spent beyond its
GIL-holding samples (gRPC's C-core threads, the kernel's side of sockets and wake-ups,
py-spy's own error) is the row "outside the GIL", from the process's CPU time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

import serve

RATE_HZ = 250

# (stage, path fragment, function name prefix or ""): the first rule matching a frame, from the
# innermost frame outwards, names the sample's stage.
Rule = tuple[str, str, str]

DRIVER_RULES: list[Rule] = [
    ("encode arguments", "serve/_serialization.py", ""),
    ("encode arguments", "serve/_request.py", "Request.encode"),
    ("frame write (header, batch, lane)", "serve/_rpc/frames.py", "BatchWriter"),
    ("frame write (header, batch, lane)", "serve/_rpc/frames.py", "FrameLane"),
    ("frame read and dispatch", "serve/_rpc/frames.py", ""),
    ("gRPC, Python side (grpc.aio)", "grpc/aio/", ""),
    ("gRPC, Python side (grpc.aio)", "grpc/_cython", ""),
    ("frame write (header, batch, lane)", "serve/_rpc/connection.py", "ReplicaConnection.send"),
    ("frame write (header, batch, lane)", "serve/_rpc/connection.py", "ReplicaConnection._write"),
    ("frame read and dispatch", "serve/_rpc/connection.py", "ReplicaConnection._read_loop"),
    ("completion: outcome to the waiter", "serve/_sync.py", "Completion._finish"),
    ("completion: outcome to the waiter", "serve/_sync.py", "_wake"),
    ("completion: outcome to the waiter", "serve/_router.py", "Router.finish"),
    ("completion: outcome to the waiter", "serve/_router.py", "Router.on_result"),
    ("routing: queue, choice, bookkeeping", "serve/_router.py", "Router._send"),
    ("routing: queue, choice, bookkeeping", "serve/_router.py", "Router.submit"),
    ("routing: queue, choice, bookkeeping", "serve/_router.py", "Router._"),
    ("routing: queue, choice, bookkeeping", "serve/_router.py", "Router.pump"),
    ("routing: queue, choice, bookkeeping", "serve/_policy.py", ""),
    ("routing: queue, choice, bookkeeping", "serve/_routing_state.py", ""),
    ("frame read and dispatch", "serve/_rpc/connection.py", ""),
    ("crossing between the caller's thread and the IO loop", "serve/_sync.py", "Mailbox"),
    ("crossing between the caller's thread and the IO loop", "serve/_sync.py", "post"),
    ("crossing between the caller's thread and the IO loop", "serve/_sync.py", "mailbox"),
    ("caller: the response awaited", "serve/_sync.py", "Completion.wait"),
    ("caller: the response awaited", "serve/handle.py", "DeploymentResponse.__await__"),
    ("caller: remote() builds the request", "serve/_request.py", ""),
    ("caller: remote() builds the request", "serve/_router.py", "Router.make_request"),
    ("caller: remote() builds the request", "serve/handle.py", ""),
    ("caller: remote() builds the request", "serve/_context.py", ""),
    ("caller: remote() builds the request", "serve/_exchange.py", ""),
    ("the benchmark's own callers", "scripts/bench", ""),
]

REPLICA_RULES: list[Rule] = [
    ("decode arguments", "serve/_serialization.py", "decode"),
    ("encode the result", "serve/_serialization.py", ""),
    ("encode the result", "replica/session.py", "_encode"),
    ("access log and stats", "serve/_logging.py", ""),
    ("access log and stats", "serve/_metrics.py", ""),
    ("reply: frame write (header, batch, lane)", "serve/_rpc/frames.py", "BatchWriter"),
    ("reply: frame write (header, batch, lane)", "serve/_rpc/frames.py", "FrameLane"),
    ("frame read", "serve/_rpc/frames.py", ""),
    ("gRPC, Python side (grpc.aio)", "grpc/aio/", ""),
    ("gRPC, Python side (grpc.aio)", "grpc/_cython", ""),
    ("sync method: worker threads and hand-offs", "replica/workers.py", ""),
    ("the method: executor and user code", "replica/executor.py", ""),
    ("the method: executor and user code", "serve/_user_methods.py", ""),
    ("the method: executor and user code", "scripts/bench.py", ""),
    ("the method: executor and user code", "serve/_context.py", ""),
    ("reply: frame write (header, batch, lane)", "replica/session.py", "StreamSession._send"),
    ("reply: frame write (header, batch, lane)", "replica/session.py", "StreamSession._finish"),
    ("reply: frame write (header, batch, lane)", "replica/session.py", "_error"),
    ("admission, request task, outcome", "replica/session.py", "StreamSession._on_request"),
    ("admission, request task, outcome", "replica/session.py", "StreamSession._on_task_done"),
    ("admission, request task, outcome", "replica/session.py", "StreamSession._run"),
    ("admission, request task, outcome", "replica/session.py", "StreamSession._outcome"),
    ("admission, request task, outcome", "replica/executor.py", ""),
    ("frame read", "replica/session.py", ""),
    ("frame read", "replica/servicer.py", ""),
]


def classify(stack: list[str], rules: list[Rule]) -> str:
    """The stage of one sample (frames outermost first, as py-spy writes them)."""
    for frame in reversed(stack):
        function, _, where = frame.partition(" (")
        for stage, path, prefix in rules:
            if path in where and function.startswith(prefix):
                return stage
    return "event loop and other (asyncio, uvloop, the interpreter)"


def read_samples(path: Path, rules: list[Rule]) -> collections.Counter[str]:
    stages: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stages[classify(stack.split(";"), rules)] += int(count)
    return stages


def _py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.path.exists(found) else None


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure_profile(
    deployments: dict[str, Any],
    seconds: float,
    *,
    rate: Callable[..., Awaitable[float]],
) -> dict[str, Any]:
    """Per stage, microseconds of CPU per request in the driver and in the replica, for each
    of ``deployments`` (name -> bound deployment with ``pid()`` and a noop ``__call__``)."""
    py_spy = _py_spy()
    if py_spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    out: dict[str, Any] = {}
    serve.start(proxy_location="Disabled")
    try:
        for name, app in deployments.items():
            handle = serve.run(app, name=f"profile-{name}", route_prefix=None)
            replica = psutil.Process(handle.pid.remote().result())
            me = psutil.Process()
            asyncio.run(rate(lambda h=handle: h.remote(b"x"), 256, 2.0))  # warm up
            with tempfile.TemporaryDirectory() as tmp:
                files = {"driver": Path(tmp) / "driver.txt", "replica": Path(tmp) / "replica.txt"}
                pids = {"driver": me.pid, "replica": replica.pid}
                spies = [
                    subprocess.Popen(
                        [
                            py_spy,
                            "record",
                            "--gil",
                            "--nonblocking",
                            "-r",
                            str(RATE_HZ),
                            "-f",
                            "raw",
                            "-d",
                            str(int(seconds)),
                            "-p",
                            str(pids[side]),
                            "-o",
                            str(files[side]),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for side in ("driver", "replica")
                ]
                time.sleep(0.5)  # py-spy attaches
                before = {"driver": cpu_s(me), "replica": cpu_s(replica)}
                served_before = handle._router.num_requests
                started = time.perf_counter()
                rps = asyncio.run(rate(lambda h=handle: h.remote(b"x"), 256, seconds - 1.0))
                elapsed = time.perf_counter() - started
                served = handle._router.num_requests - served_before
                after = {"driver": cpu_s(me), "replica": cpu_s(replica)}
                for spy in spies:
                    spy.wait(seconds + 30)
                result: dict[str, Any] = {"rps": rps}
                for side, rules in (("driver", DRIVER_RULES), ("replica", REPLICA_RULES)):
                    stages = read_samples(files[side], rules)
                    # py-spy samples for `seconds`, the load runs `seconds - 1`: scale its
                    # samples to the requests of the whole sampling time.
                    requests = served * (seconds / elapsed)
                    per_request = {
                        stage: count / RATE_HZ / requests * 1e6 for stage, count in stages.items()
                    }
                    total = (after[side] - before[side]) / served * 1e6
                    per_request["outside the GIL (gRPC C-core threads, kernel, sampling error)"] = (
                        total - sum(per_request.values())
                    )
                    result[side] = {"total_us": total, "stages_us": per_request}
                out[name] = result
            serve.delete(f"profile-{name}")
    finally:
        serve.shutdown()
    return out


def print_profile(profile: dict[str, Any]) -> None:
    if "skipped" in profile:
        print(f"profile skipped: {profile['skipped']}")
        return
    for name, result in profile.items():
        print(
            f"\nCPU per request by stage, T1 {name} noop, 256 callers ({result['rps']:,.0f} req/s)"
        )
        for side in ("driver", "replica"):
            figures = result[side]
            print(f"  {side}: {figures['total_us']:.1f} us")
            stages = sorted(figures["stages_us"].items(), key=lambda item: -item[1])
            for stage, us in stages:
                print(f"    {us:6.1f} us  {stage}")
