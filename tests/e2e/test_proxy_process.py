"""The serve-proxy process under a standalone controller: request_timeout_s, worker processes,
`serve status`, a controller restart (the proxy keeps serving, then is re-adopted), and
shutdown (nothing left behind)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

import serve
from serve._settings import settings
from tests.support.procs import (
    PROXY_ARGS,
    ROOT,
    StandaloneController,
    answers,
    free_port,
    pids_alive,
    python_env,
    run_script,
    wait_for,
)

pytestmark = pytest.mark.e2e

SERVE = [sys.executable, "-m", "serve"]


@serve.deployment
class Hi:
    def __call__(self, request: Request) -> str:
        return "hi"


app = Hi.bind()

TIMEOUT_S = 1.0

DEPLOY = """
import asyncio
import serve
from serve._settings import settings
from starlette.requests import Request

@serve.deployment(max_ongoing_requests=100)
class Hello:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(float(request.query_params.get("sleep", "0")))
        return "hello"

serve.run(Hello.bind(), name="hello", route_prefix="/hello")

@serve.deployment
class Inner:
    async def work(self, marker: str) -> str:
        try:
            await asyncio.sleep(20)
        except asyncio.CancelledError:
            open(marker, "w").write("cancelled")
            raise
        return "done"

@serve.deployment
class Outer:
    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, request: Request) -> str:
        marker = request.query_params["marker"]
        try:
            return await self.inner.work.remote(marker)
        except serve.exceptions.RequestTimeoutError as exc:
            open(marker + ".outer", "w").write(type(exc).__name__)
            raise

serve.run(Outer.bind(Inner.bind()), name="nested", route_prefix="/nested")
"""


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[StandaloneController]:
    """A standalone controller with a proxy (2 HTTP workers, a request timeout) and an app."""
    controller = StandaloneController(
        tmp_path / "state",
        *PROXY_ARGS,
        "--http-request-timeout-s",
        str(TIMEOUT_S),
        "--proxy-workers",
        "2",
        SERVE_ORPHAN_TIMEOUT_S="60",
        SERVE_LOG_LEVEL="INFO",  # the proxy's last line says it stopped (not killed)
    )
    try:
        controller.start()
        deployed = run_script(DEPLOY, env=controller.driver_env())
        assert deployed.returncode == 0, deployed.stderr
        url = f"http://{controller.healthy_proxy()['http_address']}/hello"
        wait_for(lambda: answers(url, "hello"), timeout_s=30, interval_s=0.1)
        yield controller
    finally:
        controller.cleanup()


def test_request_timeout_is_408_and_workers_share_the_port(
    proxied: StandaloneController,
) -> None:
    url = f"http://{proxied.healthy_proxy()['http_address']}/hello"
    assert len(proxied.proxy_pids()) == 2  # the proxy and its second worker
    with httpx.Client(timeout=30) as client:
        assert client.get(url).text == "hello"
        started = time.monotonic()
        late = client.get(url, params={"sleep": "20"})
        assert late.status_code == 408
        assert "request_timeout_s" in late.text
        assert time.monotonic() - started < 10
    # Several connections at once, spread over both workers by the kernel.
    replies = [httpx.get(url, timeout=30) for _ in range(20)]
    assert {r.text for r in replies} == {"hello"}


def test_the_request_timeout_travels_with_nested_calls(
    proxied: StandaloneController, tmp_path: Path
) -> None:
    """request_timeout_s becomes the deadline of the nested call too: it fails with
    RequestTimeoutError in the outer replica, and the inner replica's work is cancelled."""
    url = f"http://{proxied.healthy_proxy()['http_address']}/nested"
    marker = tmp_path / "inner"
    reply = httpx.get(url, params={"marker": str(marker)}, timeout=30)
    assert reply.status_code == 408
    wait_for(marker.exists, timeout_s=10)
    assert marker.read_text() == "cancelled"
    outer = Path(f"{marker}.outer")
    wait_for(outer.exists, timeout_s=10)
    assert outer.read_text() == "RequestTimeoutError"


def test_status_shows_the_proxy(proxied: StandaloneController) -> None:
    proxy = proxied.healthy_proxy()
    assert proxy["http_address"]
    assert proxy["pid"] in proxied.proxy_pids()
    assert f"HEALTHY (http {proxy['http_address']})" in proxied.serve("status")


@pytest.mark.parametrize("how", ["crash", "stop"])
def test_proxy_outlives_its_controller_and_is_readopted(
    proxied: StandaloneController, how: str
) -> None:
    """SIGKILL (no chance to stop anything) or SIGTERM (the controller stops alone, as its
    replicas keep serving): the proxy keeps serving, and the next controller adopts it."""
    proxy = proxied.healthy_proxy()
    url = f"http://{proxy['http_address']}/hello"
    if how == "crash":
        proxied.kill()
    else:
        proxied.stop()
    assert httpx.get(url, timeout=30).text == "hello"  # served on the last route table
    proxied.start()  # same port, same state directory
    readopted = proxied.healthy_proxy()
    assert readopted["pid"] == proxy["pid"]
    assert httpx.get(url, timeout=30).text == "hello"
    proxied.serve("shutdown")  # stops the adopted proxy too, though it is not its child
    wait_for(lambda: not pids_alive([int(proxy["pid"])]), timeout_s=30)


@pytest.fixture
def heartbeating(tmp_path: Path) -> Iterator[StandaloneController]:
    """A controller with a proxy and an app, at the default heartbeat settings."""
    controller = StandaloneController(tmp_path / "state", *PROXY_ARGS)
    try:
        controller.start()
        deployed = run_script(DEPLOY, env=controller.driver_env())
        assert deployed.returncode == 0, deployed.stderr
        yield controller
    finally:
        controller.cleanup()


def test_a_stopped_proxy_falls_silent_and_is_replaced_within_seconds(
    heartbeating: StandaloneController,
) -> None:
    """SIGSTOP: its sockets still accept, but its loop says nothing on its controller stream;
    after SERVE_HEARTBEAT_TIMEOUT_S (5 s) it is killed and a new one serves."""
    hung = heartbeating.healthy_proxy()
    os.kill(int(hung["pid"]), signal.SIGSTOP)  # alive, but answers nothing
    stopped_at = time.monotonic()

    def replaced() -> object:
        proxy = heartbeating.healthy_proxy()
        return proxy if proxy["pid"] != hung["pid"] else None

    new = wait_for(replaced, timeout_s=30, interval_s=0.2)
    took_s = time.monotonic() - stopped_at
    assert took_s < settings().heartbeat_timeout_s + 10, took_s  # was about 30 s
    assert not pids_alive([int(hung["pid"])])  # killed, not left stopped
    url = f"http://{new['http_address']}/hello"
    assert httpx.get(url, timeout=30).text == "hello"


def _starve_accept(pid: int, hard: int, url: str) -> None:
    """Lower the process's open-file limit to its lowest free descriptor: accept() fails with
    EMFILE, so the port takes no connection. A descriptor it closed after we looked (the last
    request's connection, on a loaded machine) lets one connection in: then look again."""
    for _ in range(5):
        in_use = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = next(fd for fd in range(len(in_use) + 1) if fd not in in_use)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            httpx.get(url, timeout=2)
        except httpx.TransportError:
            return  # the port takes nothing
    raise AssertionError(f"the proxy (pid {pid}) kept accepting connections")


def test_a_proxy_whose_public_port_takes_no_connection_is_kept(
    heartbeating: StandaloneController,
) -> None:
    """Its liveness is its heartbeats, never its public port: a proxy that cannot accept one
    more HTTP connection (here: no file descriptor left for one) but whose loop runs is alive;
    it stays HEALTHY, with the same pid, for two heartbeat timeouts."""
    proxy = heartbeating.healthy_proxy()
    pid = int(proxy["pid"])
    url = f"http://{proxy['http_address']}/hello"
    assert httpx.get(url, timeout=30).text == "hello"
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        _starve_accept(pid, hard, url)
        kept_until = time.monotonic() + 2 * settings().heartbeat_timeout_s
        while time.monotonic() < kept_until:
            (now,) = heartbeating.status()["proxies"].values()
            assert now["pid"] == proxy["pid"]
            assert now["status"] == "HEALTHY"
            time.sleep(0.5)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert httpx.get(url, timeout=30).text == "hello"  # and serves again


@pytest.mark.parametrize(("location", "proxies"), [("HeadOnly", 1), ("Disabled", 0)])
def test_proxy_location(tmp_path: Path, location: str, proxies: int) -> None:
    """HeadOnly: a proxy on the controller's node (on one node, as EveryNode); Disabled: none."""
    controller = StandaloneController(
        tmp_path / "state", "--proxy-location", location, "--http-port", "0"
    )
    try:
        controller.start()
        if proxies:
            controller.healthy_proxy()
        assert len(controller.status()["proxies"]) == proxies
        assert len(controller.proxy_pids()) == proxies
    finally:
        controller.cleanup()


def test_shutdown_stops_the_proxy(proxied: StandaloneController) -> None:
    pids = proxied.proxy_pids()
    assert pids
    proxy = proxied.healthy_proxy()["pid"]
    proxied.serve("shutdown")
    wait_for(lambda: not pids_alive(pids), timeout_s=30)
    # Stopped, not killed: its own cleanup ran (HAProxy's files removed, in that mode).
    (log,) = proxied.state_dir.glob("logs/proxy.log")
    assert f"serve-proxy (pid {proxy}) stopped" in log.read_text()


def test_serve_run_prints_where_the_app_is_served(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [
            *SERVE,
            "run",
            "tests.e2e.test_proxy_process:app",
            "--route-prefix",
            "/hi",
            "--non-blocking",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=python_env(
            SERVE_PROXY_LOCATION="EveryNode",
            SERVE_DEFAULT_HTTP_PORT=str(port),
            SERVE_STATE_DIR=str(tmp_path),
        ),
    )
    assert result.returncode == 0, result.stderr
    assert f"Application 'default' is ready at http://127.0.0.1:{port}/hi." in result.stdout
