"""HAProxy as the front door (SERVE_ENABLE_HA_PROXY=1) under load and faults: a rolling update
and a replica killed while `wrk` runs, HAProxy killed and started again by the controller,
and the direct ingress replicas' own behaviour (backpressure, deadlines) behind it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.requests import Request

import serve
from tests.support.ingress import (
    Ingress,
    haproxy_admin_socket,
    haproxy_requests,
    haproxy_servers,
    replica_addresses,
)
from tests.support.procs import proxy_details, wait_for

pytestmark = pytest.mark.e2e

WRK_CONNECTIONS = 16


@serve.deployment(num_replicas=2, max_ongoing_requests=100)
class Versioned:
    def __init__(self, version: str) -> None:
        self.label = version

    async def __call__(self, request: Request) -> str:
        return f"{self.label} {os.getpid()}"


def wrk(url: str, seconds: int) -> subprocess.Popen[str]:
    """wrk in the background for ``seconds`` (bounded), with ``WRK_CONNECTIONS`` connections."""
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: run scripts/install_wrk.sh (as root)")
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wrk_result(process: subprocess.Popen[str], seconds: int) -> tuple[int, int, str]:
    """(requests, failed ones: non-2xx answers and socket errors, the output)."""
    output, _ = process.communicate(timeout=seconds + 30)
    total = re.search(r"(\d+) requests in", output)
    assert total is not None, output
    failed = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        failed += int(non_2xx.group(1))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        failed += sum(int(n) for n in errors.groups())
    return int(total.group(1)), failed, output


def served_versions(url: str, count: int) -> set[str]:
    with httpx.Client(timeout=10) as client:
        return {client.get(url).text.split()[0] for _ in range(count)}


@contextlib.contextmanager
def none_failing(haproxy: Ingress, seconds: int) -> Iterator[str]:
    """Versioned "v1" at /ver under wrk load for ``seconds`` (its URL); afterwards, not one
    request may have failed."""
    serve.run(Versioned.bind("v1"), name="ver", route_prefix="/ver")
    url = haproxy.url("/ver")
    load = wrk(url, seconds)
    wait_for(lambda: served_versions(url, 4) == {"v1"}, timeout_s=10)
    yield url
    total, failed, output = wrk_result(load, seconds)
    assert total > 100, output
    assert failed == 0, output


def test_a_rolling_update_under_load_fails_no_request(haproxy: Ingress) -> None:
    with none_failing(haproxy, 10) as url:
        serve.run(Versioned.options(version="2").bind("v2"), name="ver", route_prefix="/ver")
        wait_for(lambda: served_versions(url, 4) == {"v2"}, timeout_s=30, interval_s=0.2)


def test_a_reload_under_load_fails_no_request(haproxy: Ingress) -> None:
    """A new route reloads HAProxy; the old process finishes its connections' requests."""
    with none_failing(haproxy, 8):
        for index in range(3):
            name = f"other{index}"
            serve.run(Versioned.bind("other"), name=name, route_prefix=f"/{name}")
            assert httpx.get(haproxy.url(f"/{name}"), timeout=10).text.startswith("other")


def test_a_killed_replica_fails_only_the_requests_it_held(haproxy: Ingress) -> None:
    serve.run(Versioned.bind("v1"), name="ver", route_prefix="/ver")
    url = haproxy.url("/ver")
    pids = {int(served.split()[1]) for served in _answers(url, 20)}
    assert len(pids) == 2, pids  # both replicas take requests
    started = haproxy_requests()
    load = wrk(url, 8)
    victim = sorted(pids)[0]
    wait_for(lambda: haproxy_requests() > started + 200, timeout_s=10)  # under load
    os.kill(victim, signal.SIGKILL)
    total, failed, output = wrk_result(load, 8)
    # Only requests the killed replica held can fail (HAProxy re-sends the ones it could not
    # deliver); at most one per connection was in flight.
    assert failed <= WRK_CONNECTIONS, output
    assert total > 100, output
    # The controller replaced it; HAProxy sends to the new one.
    wait_for(lambda: len(replica_addresses("ver")) == 2, timeout_s=30)
    new = wait_for(lambda: {int(a.split()[1]) for a in _answers(url, 20)} - {victim}, timeout_s=30)
    assert victim not in new


def _answers(url: str, count: int) -> list[str]:
    with httpx.Client(timeout=10) as client:
        return [client.get(url).text for _ in range(count)]


def test_haproxy_killed_is_started_again_by_the_controller(haproxy: Ingress) -> None:
    serve.run(Versioned.bind("v1"), name="ver", route_prefix="/ver")
    url = haproxy.url("/ver")
    assert httpx.get(url, timeout=10).text.startswith("v1")
    before = proxy_details()
    master = _haproxy_master(before.pid)
    master.kill()
    replaced = wait_for(
        lambda: (d := proxy_details()).pid != before.pid and d, timeout_s=30, interval_s=0.1
    )
    assert _haproxy_master(replaced.pid).pid != master.pid
    url = haproxy.url("/ver")  # serving again, through HAProxy onto the replicas
    assert httpx.get(url, timeout=10).text.startswith("v1")
    assert not master.is_running()


def test_a_proxy_stopped_takes_haproxy_and_its_files_with_it(haproxy: Ingress) -> None:
    """SIGTERM, as the controller stops a proxy: HAProxy stops and its run directory (its
    configuration, error pages and admin socket) is removed; the controller starts another."""
    serve.run(Versioned.bind("v1"), name="ver", route_prefix="/ver")
    before = proxy_details()
    master = _haproxy_master(before.pid)
    command = master.cmdline()
    run_dir = Path(command[command.index("-f") + 1]).parent
    assert (run_dir / "haproxy.cfg").is_file()
    proxy = psutil.Process(before.pid)
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(timeout=20)
    assert not run_dir.exists()
    assert not master.is_running()
    wait_for(lambda: proxy_details().pid != before.pid, timeout_s=30, interval_s=0.1)
    assert httpx.get(haproxy.url("/ver"), timeout=10).text.startswith("v1")


def _haproxy_master(proxy_pid: int) -> psutil.Process:
    haproxy_admin_socket()  # started (its socket answers)
    for child in psutil.Process(proxy_pid).children():
        if child.name() == "haproxy":
            return child
    raise AssertionError(f"no HAProxy under the serve-proxy {proxy_pid}")


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Slow:
    async def __call__(self, request: Request) -> str:
        gate = request.query_params["path"]
        Path(f"{gate}.started").write_text("")  # noqa: ASYNC240 - a test marker
        while not os.path.exists(gate):  # noqa: ASYNC110, ASYNC240 - the test opens it
            await asyncio.sleep(0.02)
        return "done"


@pytest.mark.parametrize("how", ["new version", "deleted"])
def test_a_stopping_replica_finishes_what_it_holds(
    haproxy: Ingress, tmp_path: Path, how: str
) -> None:
    """A replica replaced (drained through HAProxy's runtime API) or deleted with its route
    (HAProxy reloaded) while it serves a request: the request completes."""
    serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    url = haproxy.url("/slow")
    gate = tmp_path / "gate"
    result: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: result.append(httpx.get(url, params={"path": str(gate)}, timeout=30))
    )
    thread.start()
    wait_for(Path(f"{gate}.started").exists, timeout_s=10)
    if how == "new version":
        old = replica_addresses("slow")
        # serve.run returns once the old replica stopped, which waits for its request: the
        # gate opens while HAProxy drains it and sends new requests to its successor.
        update = threading.Thread(
            target=lambda: serve.run(
                Slow.options(version="2").bind(), name="slow", route_prefix="/slow"
            )
        )
        update.start()
        wait_for(lambda: _drained_for_another(old), timeout_s=30)
        gate.write_text("go")
        update.join(30)
        assert not update.is_alive()
    else:
        serve.delete("slow", _blocking=False)
        gate.write_text("go")
    thread.join(30)
    assert [r.status_code for r in result] == [200]


def _drained_for_another(old: list[str]) -> bool:
    """HAProxy sends nothing new to the old replica (draining, or down as it stops) and
    sends to another."""
    servers = haproxy_servers()
    held = [servers.get(address, "") for address in old]
    others = [status for address, status in servers.items() if address not in old]
    return (
        all(held)
        and not any(s.startswith("UP") for s in held)
        and any(s.startswith("UP") for s in others)
    )
