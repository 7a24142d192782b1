"""What reaches a daemon's port without the token costs it nothing, and floods do not stop it.

Each test runs its own serve-controller (and, where it says so, a replica) and attacks it over
127.0.0.1 from the test process: a huge message without the token, a message over a limit with
the token, and a flood of connections that never finish their HTTP/2 handshake.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from serve._rpc.channel import CHANNEL_OPTIONS
from serve._settings import TOKEN_METADATA_KEY
from serve._state_dir import TOKEN_FILE
from tests.support.procs import StandaloneController, run_script, wait_for

pytestmark = pytest.mark.e2e

MiB = 2**20
# 512 MB (488 MiB) is under the default SERVE_MAX_MESSAGE_BYTES (500 MiB): only the token check
# stands between this message and the daemon's memory.
TOKENLESS_BYTES = 512 * 10**6
RSS_GROWTH_LIMIT = 64 * MiB
DEFAULT_MAX_MESSAGE_BYTES = 500 * MiB
DEFAULT_MAX_CONTROL_BYTES = 4 * MiB
CALL_TIMEOUT_S = 60.0

DEPLOY_ONE = (
    "import serve\n"
    "@serve.deployment\n"
    "def echo(x: int) -> int:\n"
    "    return x\n"
    "handle = serve.run(echo.bind(), name='{name}', route_prefix=None)\n"
    "assert handle.remote(7).result(timeout_s=30) == 7\n"
    "print('served')\n"
)


def _token(controller: StandaloneController) -> str:
    return (controller.state_dir / TOKEN_FILE).read_text().strip()


def _listening_address(pid: int) -> str:
    for conn in psutil.Process(pid).net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            return f"127.0.0.1:{conn.laddr.port}"
    raise AssertionError(f"process {pid} listens on no TCP port")


class PeakRss:
    """Samples a process's RSS in a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="test:peak-rss", daemon=True)
        self.baseline = 0
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self._process.memory_info().rss)


def _call(
    address: str, method: str, payload: bytes, token: str | None
) -> tuple[grpc.StatusCode, str]:
    """One raw unary call; its status code and details."""
    metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
            unary(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A standalone controller with default limits and one replica of a deployed app."""
    controller = StandaloneController(tmp_path_factory.mktemp("wire") / "state")
    with _running(controller):
        deployed = run_script(DEPLOY_ONE.format(name="wire"), env=controller.driver_env())
        assert deployed.returncode == 0, deployed.stderr
        (replica_pid,) = controller.replica_pids()
        assert controller.process is not None
        yield {
            "controller": controller,
            "token": _token(controller),
            "targets": {
                "controller": (
                    controller.process.pid,
                    controller.address,
                    "/serve.v1.Controller/GetStatus",
                ),
                "replica": (
                    replica_pid,
                    _listening_address(replica_pid),
                    "/serve.v1.Replica/QueueLength",
                ),
            },
        }


@pytest.fixture(scope="module")
def huge() -> bytes:
    return bytes(TOKENLESS_BYTES)


@pytest.mark.parametrize("daemon", ["controller", "replica"])
def test_a_tokenless_512_mb_message_is_refused_before_it_is_read(
    cluster: dict[str, Any], huge: bytes, daemon: str
) -> None:
    pid, address, method = cluster["targets"][daemon]
    with PeakRss(pid) as rss:
        code, details = _call(address, method, huge, token=None)
    assert code == grpc.StatusCode.UNAUTHENTICATED, details
    assert rss.growth < RSS_GROWTH_LIMIT, f"{daemon} RSS grew by {rss.growth / MiB:.0f} MiB"
    # The daemon keeps serving callers with the token.
    assert _call(address, method, b"", cluster["token"]) == (grpc.StatusCode.OK, "")


def test_a_message_over_the_server_limit_is_refused_before_it_is_read(
    cluster: dict[str, Any],
) -> None:
    """Even with the token: gRPC's core refuses it from its length prefix."""
    pid, address, _ = cluster["targets"]["controller"]
    payload = bytes(DEFAULT_MAX_MESSAGE_BYTES + 1)
    with PeakRss(pid) as rss:
        code, details = _call(address, "/serve.v1.Controller/Deploy", payload, cluster["token"])
    del payload
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert f"{DEFAULT_MAX_MESSAGE_BYTES + 1} vs. {DEFAULT_MAX_MESSAGE_BYTES}" in details
    assert rss.growth < RSS_GROWTH_LIMIT, f"RSS grew by {rss.growth / MiB:.0f} MiB"
    # A driver still deploys and calls.
    deployed = run_script(DEPLOY_ONE.format(name="after"), env=cluster["controller"].driver_env())
    assert deployed.returncode == 0, deployed.stderr


@pytest.mark.parametrize(
    ("daemon", "method"),
    [
        ("controller", "/serve.v1.Controller/GetStatus"),
        ("replica", "/serve.v1.Replica/CheckHealth"),
    ],
)
def test_a_control_call_over_its_limit_gets_a_clear_error(
    cluster: dict[str, Any], daemon: str, method: str
) -> None:
    _, address, _ = cluster["targets"][daemon]
    code, details = _call(address, method, bytes(DEFAULT_MAX_CONTROL_BYTES + 1), cluster["token"])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert str(DEFAULT_MAX_CONTROL_BYTES + 1) in details
    assert str(DEFAULT_MAX_CONTROL_BYTES) in details
    assert "SERVE_MAX_CONTROL_MESSAGE_BYTES" in details


# --- connection floods ---------------------------------------------------------------------

FLOOD_CONNECTIONS = 1100
FLOOD_OPEN_S = 30.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# After half the preface, the rest one byte at a time, then an empty SETTINGS frame but for its
# last byte: the handshake is never finished.
TRICKLE = PREFACE[len(PREFACE) // 2 :] + b"\x00\x00\x00\x04\x00\x00\x00\x00"
TRICKLE_PERIOD_S = 0.25


# Sets the open-file limit, then becomes the daemon (same pid, same pipes). A preexec_fn would
# make subprocess fork() instead of vfork(), running gRPC's fork handlers in the child.
_LIMIT_THEN_EXEC = (
    "import os, resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[3:]])\n"
)


class LimitedController(StandaloneController):
    """A serve-controller started with a given open-file limit (``ulimit -n``)."""

    def __init__(self, state_dir: Path, soft: int, hard: int, **env: str) -> None:
        super().__init__(state_dir, **env)
        self.limit = (soft, hard)

    def python(self) -> list[str]:
        return [sys.executable, "-c", _LIMIT_THEN_EXEC, *map(str, self.limit)]


@contextlib.contextmanager
def _running(controller: StandaloneController) -> Iterator[StandaloneController]:
    """A started controller, stopped with its replicas however the test ends."""
    try:
        yield controller.start()
    finally:
        if controller.address:
            controller.cleanup()
        else:  # never ready: it has no replicas, and replica_pids() would match any
            controller.stop()


class Flood:
    """Connections that send half the HTTP/2 preface, then trickle, never finishing it."""

    def __init__(self, address: str, count: int) -> None:
        host, port = address.rsplit(":", 1)
        self._target = (host, int(port))
        self._count = count
        self._limit = resource.getrlimit(resource.RLIMIT_NOFILE)  # restored on exit
        self._sockets: list[socket.socket] = []
        self._closed_by_server: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, name="test:flood", daemon=True)

    def __enter__(self) -> Flood:
        soft, hard = self._limit
        if soft < self._count + 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, self._count + 256), hard))
        deadline = time.monotonic() + FLOOD_OPEN_S
        for _ in range(self._count):
            if time.monotonic() > deadline:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            try:
                sock.connect(self._target)
                sock.sendall(PREFACE[: len(PREFACE) // 2])
            except OSError:
                sock.close()
                continue
            sock.setblocking(False)
            self._sockets.append(sock)
        self._thread.start()
        return self

    def _trickle(self) -> None:
        for step in range(int(120 / TRICKLE_PERIOD_S)):  # bounded: at most 2 minutes
            for index, sock in enumerate(self._sockets):
                if index in self._closed_by_server:
                    continue
                try:
                    if step < len(TRICKLE):
                        sock.send(TRICKLE[step : step + 1])
                    closed = sock.recv(65536) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed:
                    with self._lock:
                        self._closed_by_server.add(index)
            if self._stop.wait(TRICKLE_PERIOD_S):
                return

    @property
    def opened(self) -> int:
        return len(self._sockets)

    @property
    def open(self) -> int:
        with self._lock:
            return len(self._sockets) - len(self._closed_by_server)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self._sockets:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, self._limit)


def _authenticated_call(address: str, method: str, token: str, timeout_s: float) -> None:
    """One call on a fresh channel that waits (bounded) for its connection to be accepted."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        unary(b"", metadata=((TOKEN_METADATA_KEY, token),), timeout=timeout_s, wait_for_ready=True)


CALL_APP = (
    "import serve\n"
    "assert serve.get_app_handle('{name}').remote(7).result(timeout_s=30) == 7\n"
    "print('served')\n"
)


@pytest.mark.parametrize("daemon", ["controller", "replica"])
def test_a_flood_over_the_fd_limit_is_closed_and_authenticated_callers_are_served(
    tmp_path: Path, daemon: str
) -> None:
    """`ulimit -n 1024` (soft and hard; replicas inherit it) and 1,100 connections that never
    finish the handshake.

    The daemon holds at most half its descriptors' worth of connections and closes the rest on
    accept; the trickling ones are closed when the handshake timeout passes, and a fresh caller
    with the token gets in as soon as there is room.
    """
    handshake_timeout_s = 3.0
    controller = LimitedController(
        tmp_path / "state",
        soft=1024,
        hard=1024,
        SERVE_HANDSHAKE_TIMEOUT_S=str(handshake_timeout_s),
    )
    with _running(controller):
        assert controller.process is not None
        token = _token(controller)
        pid, address, method = (
            controller.process.pid,
            controller.address,
            "/serve.v1.Controller/GetStatus",
        )
        if daemon == "replica":
            deployed = run_script(DEPLOY_ONE.format(name="flooded"), env=controller.driver_env())
            assert deployed.returncode == 0, deployed.stderr
            (pid,) = controller.replica_pids()
            address, method = _listening_address(pid), "/serve.v1.Replica/QueueLength"
        target = psutil.Process(pid)
        assert target.rlimit(psutil.RLIMIT_NOFILE) == (1024, 1024)
        with Flood(address, FLOOD_CONNECTIONS) as flood:
            assert flood.opened >= 1000
            _authenticated_call(address, method, token, timeout_s=handshake_timeout_s + 30)
            assert target.num_fds() < 1024
            wait_for(lambda: flood.open == 0, timeout_s=handshake_timeout_s + 30, interval_s=0.1)
        _authenticated_call(address, method, token, timeout_s=10)
        if daemon == "replica":  # a new driver reaches the replica
            called = run_script(CALL_APP.format(name="flooded"), env=controller.driver_env())
            assert called.returncode == 0, called.stderr


def _frame_types(data: bytes) -> list[int]:
    """The HTTP/2 frame types in a byte stream a server sent (9-byte headers, then payloads)."""
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + length :]
    return types


@pytest.mark.parametrize("unfinished_headers", [False, True])
def test_a_connection_that_makes_no_call_is_closed_when_idle(
    tmp_path: Path, unfinished_headers: bool
) -> None:
    """A finished handshake and then nothing (or the start of a HEADERS frame that never ends):
    GOAWAY and close after SERVE_IDLE_CONNECTION_TIMEOUT_S."""
    idle_timeout_s = 2.0
    controller = StandaloneController(
        tmp_path / "state", SERVE_IDLE_CONNECTION_TIMEOUT_S=str(idle_timeout_s)
    )
    with _running(controller):
        host, port = controller.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=idle_timeout_s + 30) as sock:
            sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # empty SETTINGS
            if unfinished_headers:  # HEADERS of stream 1: 100 bytes announced, 10 sent
                sock.sendall(b"\x00\x00\x64\x01\x00\x00\x00\x00\x01" + bytes(10))
            received = b""
            while chunk := sock.recv(65536):  # bounded by the socket timeout
                received += chunk
        assert 7 in _frame_types(received), "no GOAWAY before the server closed"
        _authenticated_call(
            controller.address, "/serve.v1.Controller/GetStatus", _token(controller), 10
        )


def test_a_driver_deploys_and_calls_during_a_flood_below_the_raised_fd_limit(
    tmp_path: Path,
) -> None:
    """Soft limit 1024, hard 4096: the daemon takes the hard limit at start, so 1,100
    connections that never finish the handshake leave room for drivers, replicas and links."""
    controller = LimitedController(
        tmp_path / "state",
        soft=1024,
        hard=4096,
        # Longer than everything below may take: the flood is still up when the driver is done.
        SERVE_HANDSHAKE_TIMEOUT_S="300",
    )
    with _running(controller):
        assert controller.process is not None
        assert psutil.Process(controller.process.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)
        token = _token(controller)
        with Flood(controller.address, FLOOD_CONNECTIONS) as flood:
            assert flood.opened == FLOOD_CONNECTIONS
            _authenticated_call(
                controller.address, "/serve.v1.Controller/GetStatus", token, timeout_s=10
            )
            served = run_script(
                DEPLOY_ONE.format(name="flooded"), timeout_s=90, env=controller.driver_env()
            )
            assert served.returncode == 0, served.stderr
            assert "served" in served.stdout
            assert flood.open == FLOOD_CONNECTIONS  # all of it was up the whole time
