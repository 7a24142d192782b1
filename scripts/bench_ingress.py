"""Ingress figures for `make bench`: HTTP and gRPC through serve-proxy, beside their floors.

HTTP load comes from ``wrk`` (one thread, so the client is one core and the server side the
other); when wrk is missing the HTTP figures are skipped with one line. The HTTP floor is a bare
uvicorn + httptools + uvloop raw ASGI app (scripts/bench_http_floor.py) measured the same way in
the same run. gRPC is driven by a grpc.aio client with the generated Greeter stubs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import uvloop
from fastapi import FastAPI
from starlette.requests import Request

import serve
from tests.support import greeter_pb2, greeter_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
GREETER_SERVICER = "tests.support.greeter_pb2_grpc.add_GreeterServicer_to_server"
APP = "ingress-noop"

# --- deployments -------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1000)
class HttpNoop:
    async def __call__(self, request: Request) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=1000)
class HttpSyncNoop:
    def __call__(self, request: Request) -> str:
        return "ok"


fastapi_app = FastAPI()


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(fastapi_app)
class FastAPINoop:
    @fastapi_app.get("/")
    async def root(self) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=1000)
class GrpcNoop:
    def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        return greeter_pb2.HelloReply(message="ok")


# --- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _micros(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 latency (us) and error counts from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if rps is None or p50 is None or total is None:
        raise ValueError(f"could not parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return {
        "rps": float(rps.group(1)),
        "p50_us": _micros(p50.group(1)),
        "p99_us": _micros(p99.group(1)) if p99 else None,
        "requests": int(total.group(1)),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0)
        + (sum(int(g) for g in socket.groups()) if socket else 0),
    }


def wrk(url: str, connections: int, seconds: float, script: Path | None = None) -> dict[str, Any]:
    """``script``: a wrk Lua script (e.g. one making every request a POST)."""
    duration = max(1, round(seconds))
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script is not None:
        command[-1:-1] = ["-s", str(script)]
    # subprocess.run kills wrk if it overruns.
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def wait_until_ok(url: str, timeout_s: float = 30.0) -> None:
    """Until ``url`` answers 200 (the proxy learns routes by long-poll, so not at once)."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
                last = response.status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s}s (last: {last})")


def http_pair(url: str, seconds: float) -> dict[str, Any]:
    """The two HTTP figures of one target: 64 connections (req/s) and 1 connection (p50)."""
    wait_until_ok(url)
    wrk(url, 64, 1)  # warm up: connections, caches, the replica's first requests
    return {"c64": wrk(url, 64, seconds), "c1": wrk(url, 1, seconds)}


# --- floor -------------------------------------------------------------------------------------


@contextlib.contextmanager
def http_floor_server(*args: str) -> Iterator[str]:
    """The bare uvicorn floor in its own process (``"fastapi"``: the FastAPI noop app on
    uvicorn alone); stopped (killed if need be) on the way out."""
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "bench_http_floor.py"), *args],
        stdin=subprocess.PIPE,  # it exits when this closes, however the bench ends
        stdout=subprocess.PIPE,
        text=True,
        # A session of its own, as every replica, proxy and HAProxy has: with the kernel's
        # autogroup scheduling, sharing wrk's session would give it a larger share of a loaded
        # machine than the servers it is compared with.
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the HTTP floor server did not start (printed {line!r})")
        yield f"http://127.0.0.1:{line.strip()}/"
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        if server.stdout is not None:
            server.stdout.close()


def measure_http_floor(seconds: float) -> dict[str, Any]:
    with http_floor_server() as url:
        return http_pair(url, seconds)


# --- ours --------------------------------------------------------------------------------------


def _proxy() -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        details = list(serve.status().proxy_details.values())
        if details and details[0].status == "HEALTHY":
            return details[0]
        time.sleep(0.1)
    raise RuntimeError(f"no healthy proxy in 30s: {serve.status().proxy_details}")


Call = Callable[[], Awaitable[Any]]
Latency = Callable[[Call, int, int], Awaitable[dict[str, float]]]
Rate = Callable[[Call, int, float], Awaitable[float]]


async def _grpc_client(
    address: str, n: int, warmup: int, seconds: float, latency: Latency, rate: Rate
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        request = greeter_pb2.HelloRequest(name="x")
        metadata = (("application", APP),)

        async def call() -> None:
            reply = await stub.SayHello(request, metadata=metadata, timeout=30)
            assert reply.message == "ok"

        return {
            "unary": await latency(call, n, warmup),
            "unary_rps_64": await rate(call, 64, seconds),
        }


@contextlib.contextmanager
def serve_session(env: dict[str, str] | None = None, **options: Any) -> Iterator[None]:
    """A serve session of its own with a proxy on ephemeral ports (``env`` in every daemon's
    environment; ``options`` more of serve.start's); shut down after."""
    # The proxy imports the servicer function, and replicas the stubs, from this checkout.
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    serve.start(
        proxy_location="EveryNode",
        http_options={"host": "127.0.0.1", "port": 0},
        controller_options={"runtime_env": {"env_vars": env or {}}},
        **options,
    )
    try:
        yield
    finally:
        serve.shutdown()
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path


def measure_ingress(
    seconds: float,
    latency_n: int,
    warmup_n: int,
    latency: Latency,
    rate: Rate,
    http: bool,
    variants: bool = True,
) -> dict[str, Any]:
    """Ours, in a serve session of its own with a proxy on ephemeral ports; shut down after.
    ``latency`` and ``rate`` are bench.py's measures (async_latency, closed_loop)."""
    out: dict[str, Any] = {}
    grpc_options = {"port": 0, "grpc_servicer_functions": [GREETER_SERVICER]}
    with serve_session(grpc_options=grpc_options):
        if http:
            targets: list[tuple[str, Any]] = [("async", HttpNoop)]
            if variants:
                targets += [("sync", HttpSyncNoop), ("fastapi", FastAPINoop)]
            for name, deployment in targets:
                serve.run(deployment.bind(), name=APP, route_prefix="/")
                url = f"http://{_proxy().http_address}/"
                out[f"http_{name}"] = http_pair(url, seconds)
                serve.delete(APP)
        serve.run(GrpcNoop.bind(), name=APP, route_prefix="/")
        out["grpc"] = uvloop.run(
            _grpc_client(_proxy().grpc_address, latency_n, warmup_n, seconds, latency, rate)
        )
    return out


def have_wrk() -> bool:
    if shutil.which("wrk"):
        return True
    print(
        "HTTP ingress figures skipped: wrk is not installed "
        "(scripts/install_wrk.sh, or: sudo apt-get install -y wrk)",
        file=sys.stderr,
    )
    return False
