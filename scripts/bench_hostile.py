"""The proxy's front door under attack, measured with its default limits (`make bench-hostile`).

One standalone controller with a proxy on an ephemeral port and three applications (a noop,
a handler that reads the body, one that never does). For each attack, a polite client keeps
sending one request at a time; the script prints what the attack achieved (connections held,
memory, time to refusal) beside the polite client's latency, and the same latency without any
attack, measured in the same run. Each attack is bounded in count and time.

    .venv/bin/python scripts/bench_hostile.py [--idle 20000] [--upload-gib 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.procs import StandaloneController, run_script  # noqa: E402

MiB = 2**20

DEPLOY = """
import asyncio, resource
import serve
from starlette.requests import Request

@serve.deployment(max_ongoing_requests=100)
class Hello:
    async def __call__(self, request: Request) -> str:
        return "hello"

@serve.deployment(max_ongoing_requests=100)
class Reader:
    async def __call__(self, request: Request) -> dict:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"bytes": total, "peak_mb": peak_mb}

@serve.deployment(max_ongoing_requests=100)
class Sink:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(3600)
        return "never"

serve.run(Hello.bind(), name="hello", route_prefix="/")
serve.run(Reader.bind(), name="reader", route_prefix="/read")
serve.run(Sink.bind(), name="sink", route_prefix="/sink")
"""


class Polite:
    """One request at a time for as long as the block runs; latencies in ms."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Polite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    self.failures += 1
                time.sleep(0.01)

    def summary(self) -> str:
        lat = sorted(self.latencies_ms)
        if not lat:
            return f"no answers, {self.failures} failed"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"p50 {statistics.median(lat):.1f} ms, p99 {p99:.1f} ms, "
            f"{len(lat)} answered, {self.failures} failed"
        )


class Rows:
    """Each figure printed as soon as it is measured."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"{row[0]:<44}  {row[1]}", flush=True)


def connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@contextlib.contextmanager
def peak_rss(process: psutil.Process) -> Iterator[list[float]]:
    peak = [process.memory_info().rss / MiB, 0.0]
    peak[1] = peak[0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                peak[1] = max(peak[1], process.memory_info().rss / MiB)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(10)


def header_bomb(host: str, port: int) -> tuple[float, bytes]:
    """Seconds from the first header byte to the refusal, and the status line."""
    sock = connect(host, port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
    started = time.perf_counter()
    sock.setblocking(False)
    chunk = b"a" * 65536
    answer = b""
    while time.perf_counter() - started < 60:
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            sock.send(chunk)
        try:
            answer = sock.recv(4096)
            break
        except BlockingIOError:
            continue
        except ConnectionResetError:
            break
    elapsed = time.perf_counter() - started
    sock.close()
    return elapsed, answer.split(b"\r\n", 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=20_000, help="idle connections to open")
    parser.add_argument("--slow", type=int, default=1000, help="slowloris connections")
    parser.add_argument("--upload-gib", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="per attack")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # This client needs a descriptor per connection too, and some to spare.
    args.idle = min(args.idle, hard - 1000)
    with tempfile.TemporaryDirectory() as tmp:
        controller = StandaloneController(
            Path(tmp) / "state",
            "--proxy-location",
            "EveryNode",
            "--http-port",
            "0",
            SERVE_ORPHAN_TIMEOUT_S="60",
            SERVE_LOG_LEVEL="WARNING",
            # The one limit raised from its default: the upload figures need a big body.
            SERVE_HTTP_MAX_BODY_BYTES=str(int(args.upload_gib * 2**30) + MiB),
        )
        try:
            controller.start()
            deployed = run_script(DEPLOY, timeout_s=120, **controller.driver_env())
            assert deployed.returncode == 0, deployed.stderr
            run(controller, args)
        finally:
            controller.cleanup()


def run(controller: StandaloneController, args: argparse.Namespace) -> None:
    proxy = controller.healthy_proxy(timeout_s=60)
    address = str(proxy["http_address"])
    host, port_text = address.rsplit(":", 1)
    port = int(port_text)
    url = f"http://{address}"
    process = psutil.Process(int(str(proxy["pid"])))
    rows = Rows()

    with Polite(url) as quiet:
        time.sleep(args.seconds)
    rows.append(("polite client, no attack", quiet.summary()))

    # Header bombs, one after another.
    times = []
    status = b""
    with Polite(url) as polite:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            elapsed, status = header_bomb(host, port)
            times.append(elapsed * 1000)
    rows.append(
        (
            "header bomb: time to refusal",
            f"median {statistics.median(times):.1f} ms over {len(times)} bombs ({status.decode()})",
        )
    )
    rows.append(("  polite client meanwhile", polite.summary()))

    # Idle connections, far past the cap.
    fds_before = process.num_fds()
    idle: list[socket.socket] = []
    opened = failed = 0
    with Polite(url) as polite:
        started = time.monotonic()
        for _ in range(args.idle):
            try:
                idle.append(connect(host, port))
                opened += 1
            except OSError:
                failed += 1
            if time.monotonic() - started > 4 * args.seconds:
                break
        held = process.num_fds() - fds_before
        time.sleep(2)
    for sock in idle:
        sock.close()
    rows.append(
        (
            f"{opened} idle connections opened ({failed} refused)",
            f"proxy holds {held} (SERVE_HTTP_MAX_CONNECTIONS 10,000; idle ones make room)",
        )
    )
    rows.append(("  polite client meanwhile", polite.summary()))

    # Slowloris: half-sent heads and dribbled bodies, a byte a second each.
    slow: list[socket.socket] = []
    for i in range(args.slow):
        with contextlib.suppress(OSError):
            sock = connect(host, port)
            if i % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            else:
                sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            slow.append(sock)
    with Polite(url) as polite:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"X")
            time.sleep(1.0)
    for sock in slow:
        sock.close()
    rows.append((f"slowloris, {len(slow)} connections", "a byte a second each"))
    rows.append(("  polite client meanwhile", polite.summary()))

    # A big upload read by the handler, then one to a handler that never reads.
    size = int(args.upload_gib * 2**30)
    chunk = os.urandom(MiB)

    def body() -> Iterator[bytes]:
        for _ in range(size // MiB):
            yield chunk

    with Polite(url) as polite, peak_rss(process) as peak, httpx.Client(timeout=600) as client:
        started = time.perf_counter()
        reply = client.post(f"{url}/read", content=body()).json()
        elapsed = time.perf_counter() - started
    rows.append(
        (
            f"{args.upload_gib:g} GiB upload, read by the handler",
            f"{size / MiB / elapsed:.0f} MB/s; proxy RSS {peak[0]:.0f} -> peak {peak[1]:.0f} MB; "
            f"replica peak {reply['peak_mb']:.0f} MB",
        )
    )
    rows.append(("  polite client meanwhile", polite.summary()))
    with Polite(url) as polite, peak_rss(process) as peak:
        sock = connect(host, port)
        sock.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        sock.close()
    rows.append(
        (
            f"{args.upload_gib:g} GiB upload, handler never reads",
            f"{sent / MiB:.1f} MB accepted in {args.seconds:g}s; proxy RSS {peak[0]:.0f} -> "
            f"peak {peak[1]:.0f} MB",
        )
    )
    rows.append(("  polite client meanwhile", polite.summary()))


if __name__ == "__main__":
    main()
