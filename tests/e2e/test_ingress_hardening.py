"""The proxy as a front door, tried as a hostile or careless client would: header bombs, idle
and half-sent connections, bodies too big, too slow or never read, WebSocket floods and
departures, long request ids, oversized gRPC messages. Each test asserts the bound (status,
bytes, memory, descriptors) through the real proxy on real sockets, and that a polite client
keeps being served meanwhile.

The proxy runs under a standalone controller with small limits, so each bound is reached in a
test's time; the defaults are in serve/_settings.py (the docs' settings reference).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import websockets
import websockets.exceptions

from tests.conftest import GREETER_SERVICER
from tests.support import greeter_pb2, greeter_pb2_grpc
from tests.support.ingress import MODE_ENV
from tests.support.procs import PROXY_ARGS, StandaloneController, answers, run_script, wait_for

pytestmark = pytest.mark.e2e

MiB = 2**20
MAX_CONNECTIONS = 40
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 50
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 200 * MiB
MAX_MESSAGE_BYTES = 8 * MiB
ROTATION_BYTES = 64 * 1024

DEPLOY = """
import asyncio, os, resource, sys
from pathlib import Path
import serve
from fastapi import FastAPI, WebSocket
from starlette.requests import Request

MARKERS = Path(sys.argv[1])

def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

@serve.deployment(max_ongoing_requests=100)
class Hello:
    async def __call__(self, request: Request) -> str:
        return "hello"

@serve.deployment(max_ongoing_requests=5)
class Limited:
    async def __call__(self, request: Request) -> str:
        return f"read {len(await request.body())}"

@serve.deployment(max_ongoing_requests=1)
class Sink:
    # Never reads the body of a POST; a GET answers at once (its slot is free).
    async def __call__(self, request: Request) -> str:
        if request.method == "POST":
            await asyncio.sleep(3600)
        return "free"

@serve.deployment(max_ongoing_requests=100)
class Reader:
    async def __call__(self, request: Request) -> dict:
        before = peak_rss_mb()
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
        return {"bytes": total, "peak_before_mb": before, "peak_after_mb": peak_rss_mb()}

sockets = FastAPI()

@serve.deployment(max_ongoing_requests=5)
@serve.ingress(sockets)
class Sockets:
    @sockets.websocket("/slow/{name}")
    async def slow(self, ws: WebSocket, name: str) -> None:
        await ws.accept()
        (MARKERS / f"{name}.rss").write_text(str(peak_rss_mb()))
        try:
            while True:
                await ws.receive_bytes()
                await asyncio.sleep(1.0)  # reads one message a second
        finally:
            (MARKERS / f"{name}.rss").write_text(str(peak_rss_mb()))
            (MARKERS / name).write_text("ended")

    @sockets.websocket("/idle/{name}")
    async def idle(self, ws: WebSocket, name: str) -> None:
        await ws.accept()
        try:
            await asyncio.sleep(3600)  # neither reads nor writes
        finally:
            (MARKERS / name).write_text("ended")

    @sockets.get("/ping")
    def ping(self) -> str:
        return "pong"

@serve.deployment
class Greeter:
    def SayHello(self, request):
        from tests.support import greeter_pb2
        return greeter_pb2.HelloReply(message=f"Hello {request.name}")

for app, name, prefix in [
    (Hello.bind(), "hello", "/"),
    (Limited.bind(), "limited", "/limited"),
    (Sink.bind(), "sink", "/sink"),
    (Reader.bind(), "reader", "/read"),
    (Sockets.bind(), "sockets", "/ws"),
    (Greeter.bind(), "greeter", "/greeter"),
]:
    serve.run(app, name=name, route_prefix=prefix)
"""


class Front:
    """The guarded proxy: its addresses and process, and a place for the apps' markers."""

    def __init__(self, controller: StandaloneController, markers: Path, mode: str) -> None:
        self.controller = controller
        self.mode = mode  # "proxy", or "haproxy": HAProxy in front of direct ingress
        self.markers = markers
        proxy = controller.healthy_proxy()
        self.http = proxy["http_address"]
        self.grpc = proxy["grpc_address"]
        self.host, port = self.http.rsplit(":", 1)
        self.port = int(port)
        self.url = f"http://{self.http}"
        self.process = psutil.Process(int(proxy["pid"]))

    @property
    def head_too_large(self) -> bytes:
        """The answer's start to a request head over the limits: HAProxy answers 400."""
        return b"HTTP/1.1 400 " if self.mode == "haproxy" else b"HTTP/1.1 431 "

    def only_through_the_proxy(self, why: str) -> None:
        if self.mode == "haproxy":
            pytest.skip(f"Not behind HAProxy: {why}")

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def replica_http(self, app: str) -> str:
        """Where the application's ingress replica serves HTTP itself (behind HAProxy)."""
        found = run_script(
            "import serve\nfrom tests.support.ingress import replica_addresses\n"
            f"serve.status()\nprint(replica_addresses({app!r})[0])\n",
            env=self.controller.driver_env(),
        )
        assert found.returncode == 0, found.stderr
        return found.stdout.split()[-1]

    def replica(self, app: str) -> psutil.Process:
        pids = [
            p
            for p in self.controller.replica_pids()
            if f"--replica-id {app}#" in " ".join(psutil.Process(p).cmdline())
        ]
        assert len(pids) == 1, pids
        return psutil.Process(pids[0])


@pytest.fixture(scope="module", params=["proxy", "haproxy"])
def front(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Front]:
    tmp = tmp_path_factory.mktemp("front")
    markers = tmp / "markers"
    markers.mkdir()
    controller = StandaloneController(
        tmp / "state",
        *PROXY_ARGS,
        "--grpc-port",
        "0",
        "--grpc-servicer-functions",
        GREETER_SERVICER,
        SERVE_ORPHAN_TIMEOUT_S="60",
        SERVE_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        SERVE_HTTP_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        SERVE_HTTP_MAX_HEADERS=str(MAX_HEADERS),
        SERVE_HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        SERVE_HTTP_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        SERVE_HTTP_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        SERVE_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        SERVE_ROTATION_MAX_BYTES=str(ROTATION_BYTES),
        SERVE_ROTATION_BACKUP_COUNT="2",
        SERVE_LOG_LEVEL="INFO",  # access lines, for the rotation test
        **MODE_ENV[request.param],
    )
    try:
        controller.start()
        deployed = run_script(
            f"import sys; sys.argv = ['deploy', {str(markers)!r}]\n" + DEPLOY,
            timeout_s=120,
            env=controller.driver_env(),
        )
        assert deployed.returncode == 0, deployed.stderr
        front = Front(controller, markers, request.param)
        wait_for(lambda: answers(front.url), timeout_s=30, interval_s=0.1)
        yield front
    finally:
        controller.cleanup()


class Polite:
    """A well-behaved client in a thread, one request at a time, for as long as a test runs:
    every answer must be 200, and it must get some."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self.statuses: list[int | str] = []
        self.latencies_s: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Polite:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(AssertionError):  # check() says what it got
            wait_for(lambda: len(self.statuses) >= 3, timeout_s=30)
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set() and len(self.statuses) < 10_000:
                started = time.monotonic()
                try:
                    status: int | str = client.get(self._url).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.latencies_s.append(time.monotonic() - started)
                self.statuses.append(status)
                time.sleep(0.02)

    def check(self, at_least: int = 3) -> None:
        assert len(self.statuses) >= at_least, self.statuses
        assert set(self.statuses) == {200}, self.statuses


def read_response(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def send_until_stalled(sock: socket.socket, chunk: bytes, seconds: float) -> int:
    """Write ``chunk`` repeatedly for ``seconds`` (or until the peer closes); bytes accepted."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
    sock.setblocking(True)
    return sent


class PeakRss:
    """The highest resident size of a process while the block runs, sampled."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self._stop = threading.Event()
        self.before_mb = process.memory_info().rss / MiB
        self.peak_mb = self.before_mb
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak_mb = max(self.peak_mb, self._process.memory_info().rss / MiB)

    @property
    def growth_mb(self) -> float:
        return self.peak_mb - self.before_mb


# Request heads.


def test_header_bombs_are_refused_while_others_are_served(front: Front) -> None:
    with Polite(front.url) as polite:
        deadline = time.monotonic() + 3
        bombs = 0
        while time.monotonic() < deadline:
            sock = front.connect()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Bomb: ")
            sent = send_until_stalled(sock, b"a" * 65536, seconds=5)
            answer = read_response(sock)
            sock.close()
            bombs += 1
            assert answer.startswith(front.head_too_large), answer[:200]
            assert front.mode == "haproxy" or b"SERVE_HTTP_MAX_HEADER_BYTES" in answer
            # The proxy stopped reading at the limit: what it took is bounded by the limit
            # plus the kernel's socket buffers, not by how long the client kept sending.
            assert sent < 16 * MiB
    assert bombs >= 2
    polite.check()


def test_too_many_headers_are_refused(front: Front) -> None:
    sock = front.connect()
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n"
    sock.sendall(head)
    answer = read_response(sock)
    sock.close()
    assert answer.startswith(front.head_too_large), answer[:200]
    assert front.mode == "haproxy" or b"SERVE_HTTP_MAX_HEADERS" in answer
    # As many as allowed are fine.
    sock = front.connect()
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"X-A: 1\r\n" * 40 + b"\r\n"
    )
    assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_a_half_sent_head_is_answered_408_and_closed(front: Front) -> None:
    sock = front.connect()
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
    started = time.monotonic()
    answer = read_response(sock, timeout_s=HEADER_TIMEOUT_S + 10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 5


# Connections.


def test_idle_connections_never_lock_clients_out(front: Front) -> None:
    """Three times the cap in connections that send nothing (or half a head): the proxy keeps
    at most the cap, idle ones make room for new ones, and a client with a request gets in."""
    fds_before = front.process.num_fds()
    idle: list[socket.socket] = []
    try:
        with Polite(front.url) as polite:
            for i in range(3 * MAX_CONNECTIONS):
                sock = front.connect()
                if i % 2:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head
                idle.append(sock)
            held = front.process.num_fds() - fds_before
            time.sleep(0.5)
        polite.check()
        assert held <= MAX_CONNECTIONS + 10, held
        # The connections still open are closed by the header timeout.
        assert all(closed_by_server(sock, HEADER_TIMEOUT_S + 10) for sock in idle)
    finally:
        for sock in idle:
            sock.close()


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(front: Front) -> None:
    front.only_through_the_proxy(
        "connections over HAProxy's maxconn wait in the accept queue instead of getting 503"
    )
    busy: list[socket.socket] = []
    try:
        # More requests than the cap, each on its own connection (they wait in the queue of
        # a deployment with one slot): the cap fills with connections that are all busy.
        for _ in range(MAX_CONNECTIONS + 5):
            sock = front.connect()
            sock.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            busy.append(sock)
        for _ in range(3):
            sock = front.connect()
            answer = read_response(sock, timeout_s=10)  # at once, not after a timeout
            sock.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
            assert b"SERVE_HTTP_MAX_CONNECTIONS" in answer
    finally:
        for sock in busy:
            sock.close()
    # Their requests were cancelled when they left: the sink's one slot is free again.
    wait_for(lambda: httpx.get(f"{front.url}/sink", timeout=10).text == "free", timeout_s=30)


# Bodies.


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(front: Front) -> None:
    sock = front.connect()
    sock.sendall(
        b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    )
    answer = read_response(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    if front.mode == "proxy":  # HAProxy's own 413 page names no setting
        assert b"SERVE_HTTP_MAX_BODY_BYTES" in answer


def test_a_chunked_body_is_cut_at_the_limit(front: Front) -> None:
    chunk = b"x" * MiB

    def body() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // MiB + 8):
            yield chunk

    with httpx.Client(timeout=60) as client:
        try:
            status = client.post(f"{front.url}/read", content=body()).status_code
        except httpx.HTTPError:
            status = 413  # the proxy answered and closed while the client was still sending
    assert status == 413


def test_an_upload_to_a_handler_that_never_reads_costs_a_window(front: Front) -> None:
    """The proxy reads a body only as fast as the replica reads it: a handler that never does
    holds the client back (TCP), not the upload in memory. Leaving frees the slot."""
    sink = front.replica("sink")
    with PeakRss(front.process) as proxy_rss, PeakRss(sink) as sink_rss:
        sock = front.connect()
        sock.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * 2**30))
        sent = send_until_stalled(sock, b"x" * MiB, seconds=4)
        sock.close()  # an aborted upload
    assert sent < 64 * MiB, sent  # of 2 GiB: the window, uvicorn's buffer, the kernel's
    assert proxy_rss.growth_mb < 48, proxy_rss.peak_mb
    assert sink_rss.growth_mb < 48, sink_rss.peak_mb
    # The handler was cancelled when the client left, though it was behind on the body.
    wait_for(lambda: httpx.get(f"{front.url}/sink", timeout=10).text == "free", timeout_s=30)


def test_a_big_upload_read_normally_streams_in_bounded_memory(front: Front) -> None:
    size = 128 * MiB
    chunk = b"y" * MiB

    def body() -> Iterator[bytes]:
        for _ in range(size // MiB):
            yield chunk

    with PeakRss(front.process) as proxy_rss, httpx.Client(timeout=120) as client:
        reply = client.post(f"{front.url}/read", content=body())
    assert reply.status_code == 200, reply.text
    seen = reply.json()
    assert seen["bytes"] == size
    assert seen["peak_after_mb"] - seen["peak_before_mb"] < 48, seen
    assert proxy_rss.growth_mb < 48, proxy_rss.peak_mb


@pytest.mark.parametrize("door", ["front", "replica"])
def test_slow_bodies_hold_no_replica_slot(front: Front, door: str) -> None:
    """Five clients dribbling their bodies (the deployment's max_ongoing_requests): the body is
    read before the request takes a slot (by the proxy before routing, by a replica serving
    HTTP itself before admission: behind HAProxy, or sent to straight), so every other request
    is answered meanwhile, and the slow ones once their bodies are complete."""
    if door == "replica" and front.mode == "proxy":
        pytest.skip("Behind the default proxy, replicas serve no HTTP of their own")
    address = front.http if door == "front" else front.replica_http("limited")
    host, port = address.rsplit(":", 1)
    size = 100
    slow = []
    try:
        with Polite(front.url) as polite:
            for _ in range(5):
                sock = socket.create_connection((host, int(port)), timeout=10)
                sock.sendall(
                    b"POST /limited HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % size
                )
                slow.append(sock)
            answered = []
            with httpx.Client(timeout=10) as client:
                for i in range(7):
                    for sock in slow:
                        sock.sendall(b"z")  # one byte each, now and then
                    answered.append(client.post(f"http://{address}/limited", content=b"q" * i))
            assert [a.text for a in answered] == [f"read {i}" for i in range(7)]
            for sock in slow:  # the rest: each is served now, none was cut meanwhile
                sock.sendall(b"z" * (size - 7))
            replies = [read_response(sock) for sock in slow]
        assert all(r.startswith(b"HTTP/1.1 200 ") for r in replies), replies
        assert all(r.endswith(b"read %d" % size) for r in replies), replies
        polite.check()
    finally:
        for sock in slow:
            sock.close()


def test_a_stalled_body_is_cut(front: Front) -> None:
    sock = front.connect()
    sock.sendall(b"POST /limited HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
    started = time.monotonic()
    answer = read_response(sock, timeout_s=BODY_TIMEOUT_S + 10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"SERVE_HTTP_BODY_TIMEOUT_S" in answer
    assert time.monotonic() - started < BODY_TIMEOUT_S + 5


# WebSockets.


def test_a_websocket_flood_is_held_back_and_its_departure_ends_the_handler(front: Front) -> None:
    """512 KiB messages as fast as the client can, to a handler that reads one a second: the
    client is held back (bounded queues both ways), and when it leaves the handler ends at
    once rather than after the backlog."""
    front.only_through_the_proxy(
        "a gap: a direct-ingress replica sees a WebSocket client leave only after the messages "
        "uvicorn queued"
    )
    sockets = front.replica("sockets")
    message = os.urandom(512 * 1024)  # incompressible: permessage-deflate would hide the flood

    async def flood() -> int:
        sent = 0
        async with websockets.connect(f"ws://{front.http}/ws/slow/flood", max_size=None) as ws:
            deadline = time.monotonic() + 4
            with contextlib.suppress(TimeoutError):
                while time.monotonic() < deadline:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                        await ws.send(message)
                    sent += 1
        return sent

    with PeakRss(front.process) as proxy_rss, PeakRss(sockets) as replica_rss:
        sent = asyncio.run(flood())
    # uvicorn's queue (32 messages), the ingress window, kernel buffers: far from 4 s of flood.
    assert sent < 120, sent
    assert proxy_rss.growth_mb < 64, proxy_rss.peak_mb
    assert replica_rss.growth_mb < 48, replica_rss.peak_mb
    wait_for((front.markers / "flood").exists, timeout_s=10)


def test_websockets_whose_clients_leave_free_their_slots(front: Front) -> None:
    """Clients that connect and leave at once must not wedge a deployment with
    max_ongoing_requests=5: each handler is cancelled when its client goes."""

    async def visit(name: str) -> None:
        async with websockets.connect(f"ws://{front.http}/ws/idle/{name}"):
            pass

    async def visits() -> None:
        await asyncio.gather(*(visit(f"left{i}") for i in range(5)))

    asyncio.run(visits())
    for i in range(5):
        wait_for((front.markers / f"left{i}").exists, timeout_s=10)
    assert httpx.get(f"{front.url}/ws/ping", timeout=10).json() == "pong"


# Request ids and logs.


def test_long_request_ids_are_replaced_and_logs_rotate(front: Front) -> None:
    with httpx.Client(timeout=10) as client:
        assert (
            client.get(front.url, headers={"X-Request-ID": "mine"}).headers["x-request-id"]
            == "mine"
        )
        given = "r" * 1000
        answered = client.get(front.url, headers={"X-Request-ID": given}).headers["x-request-id"]
        assert answered != given
        assert len(answered) == 32
        # Enough access lines to rotate the replica's log (ROTATION_BYTES) more than twice.
        for _ in range(1500):
            assert client.get(front.url, headers={"X-Request-ID": "i" * 120}).status_code == 200
    logs = front.controller.state_dir / "logs"
    current = list(logs.glob("replica_hello_Hello_*.log"))
    assert len(current) == 1, sorted(p.name for p in logs.iterdir())

    def rotated() -> bool:
        return Path(f"{current[0]}.2").exists()

    wait_for(rotated, timeout_s=10)
    assert not Path(f"{current[0]}.3").exists()  # SERVE_ROTATION_BACKUP_COUNT=2
    for path in (current[0], Path(f"{current[0]}.1"), Path(f"{current[0]}.2")):
        assert path.stat().st_size <= ROTATION_BYTES + 1024
        assert path.stat().st_mode & 0o777 == 0o600


# gRPC.


def test_grpc_messages_over_the_limit_are_refused(front: Front) -> None:
    with grpc.insecure_channel(
        front.grpc,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    ) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        metadata = (("application", "greeter"),)
        with pytest.raises(grpc.RpcError) as error:
            stub.SayHello(
                greeter_pb2.HelloRequest(name="x" * (MAX_MESSAGE_BYTES + 1)),
                metadata=metadata,
                timeout=30,
            )
        if front.mode == "haproxy":
            # A gap: the replica's server refuses the message mid-upload and resets its stream;
            # HAProxy resets the client's stream in turn (CANCELLED), its status unseen.
            assert error.value.code() == grpc.StatusCode.CANCELLED
        else:
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = stub.SayHello(greeter_pb2.HelloRequest(name="y"), metadata=metadata, timeout=30)
        assert reply.message == "Hello y"


# Reference cycles: what an aborted request leaves must go at once, not at the next GC pass.

PROBE = """
import asyncio, gc, json, sys, threading
gc.disable()
gc.set_debug(gc.DEBUG_SAVEALL)
import uvloop
from serve._proxy.server import ProxyServer
from serve._settings import settings
from serve._state_dir import read_token
from serve.config import HTTPOptions, gRPCOptions

def report():
    gc.collect()
    ours, big = {}, 0
    for obj in gc.garbage:
        module = getattr(type(obj), "__module__", "") or ""
        if module.split(".")[0] in ("serve", "replica", "uvicorn", "starlette"):
            name = f"{module}.{type(obj).__qualname__}"
            ours[name] = ours.get(name, 0) + 1
        elif isinstance(obj, (bytes, bytearray)) and len(obj) >= 65536:
            big += len(obj)
    gc.garbage.clear()
    print(json.dumps({"ours": ours, "big_bytes": big}), flush=True)

async def main():
    loop = asyncio.get_running_loop()
    def commands():
        for _ in sys.stdin:
            loop.call_soon_threadsafe(report)
    threading.Thread(target=commands, daemon=True).start()
    s = settings()
    server = ProxyServer(
        controller_address=sys.argv[1],
        token=s.token or read_token(s.state_dir),
        tls=None,
        node_id="gc-probe",
        http=HTTPOptions(host="127.0.0.1", port=0),
        grpc=gRPCOptions(port=0, grpc_servicer_functions=(sys.argv[2],)),
        orphan_timeout_s=60,
    )
    return await server.run()

sys.exit(uvloop.run(main()))
"""


def test_aborted_requests_leave_no_reference_cycles(front: Front) -> None:
    """The real proxy server in a process with the cyclic GC off: requests that are aborted
    (uploads cut off, clients leaving mid-request, refusals) and ordinary ones leave nothing
    that only the cyclic collector would free: their memory goes when they end."""
    front.only_through_the_proxy("it probes the default proxy's own server in a process of its own")
    import json
    import subprocess
    import sys

    from tests.support.procs import ROOT, python_env

    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, front.controller.address, GREETER_SERVICER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=python_env(**front.controller.driver_env()),
    )
    assert probe.stdin is not None
    assert probe.stdout is not None

    def report() -> dict[str, object]:
        assert probe.stdin is not None
        assert probe.stdout is not None
        probe.stdin.write("report\n")
        probe.stdin.flush()
        return json.loads(probe.stdout.readline())

    try:
        ready = json.loads(probe.stdout.readline())
        host, port = ready["http"].rsplit(":", 1)
        url = f"http://{ready['http']}"
        wait_for(lambda: httpx.get(url, timeout=10).text == "hello", timeout_s=30)
        report()  # what starting up left

        def connect() -> socket.socket:
            return socket.create_connection((host, int(port)), timeout=10)

        for _ in range(3):
            # An upload to a handler that never reads it, cut off by its client.
            sock = connect()
            sock.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**30)
            send_until_stalled(sock, os.urandom(MiB), seconds=1)
            sock.close()
            wait_for(lambda: httpx.get(f"{url}/sink", timeout=10).text == "free", timeout_s=30)
            # A client that leaves while its request waits in the queue, body in hand.
            blocker = connect()
            blocker.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            queued = connect()
            queued.sendall(
                b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n"
                + os.urandom(200_000)
            )
            time.sleep(0.3)
            queued.close()
            blocker.close()
            wait_for(lambda: httpx.get(f"{url}/sink", timeout=10).text == "free", timeout_s=30)
            # Refusals, and ordinary requests.
            big = httpx.post(f"{url}/read", content=os.urandom(3 * MiB), timeout=30)
            assert big.json()["bytes"] == 3 * MiB
            assert httpx.get(f"{url}/nowhere/x", timeout=10).status_code in (200, 404)
            assert httpx.get(url, headers={"X-A": "a" * 70_000}, timeout=10).status_code == 431
            # gRPC calls that fail.
            with grpc.insecure_channel(ready["grpc"]) as channel:
                unknown: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                    "/greeter.Greeter/NoSuchMethod"
                )
                with pytest.raises(grpc.RpcError) as error:
                    unknown(b"", metadata=(("application", "greeter"),), timeout=10)
                assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        left = report()
        assert left == {"ours": {}, "big_bytes": 0}, left
    finally:
        probe.kill()
        probe.wait(10)
        probe.stdin.close()
        probe.stdout.close()
