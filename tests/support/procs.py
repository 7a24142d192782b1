"""Processes in tests: wait on conditions, find serve daemons, never leak."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import psutil

ROOT = Path(__file__).resolve().parents[2]


def wait_for(
    predicate: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02
) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Condition not met within {timeout_s}s: {predicate}")
        time.sleep(interval_s)


def serve_processes(root_pid: int | None = None) -> list[psutil.Process]:
    """serve-controller / serve-replica / serve-proxy (and HAProxy) processes descended from
    ``root_pid`` (default: us)."""
    try:
        root = psutil.Process(root_pid or os.getpid())
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        daemon = any(f"-m {m}" in cmdline for m in ("controller", "replica", "serve._proxy"))
        if daemon or "/serve-haproxy-" in cmdline:  # HAProxy, run by a serve-proxy
            found.append(child)
    return found


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def python_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SERVE_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_script(
    code: str,
    *,
    timeout_s: float = 60.0,
    cwd: str | Path = ROOT,
    env: Mapping[str, str] | None = None,
    **variables: str,
) -> subprocess.CompletedProcess[str]:
    """Run a Python driver script in its own process (in ``cwd``) and wait for it.

    Its environment is ours plus ``env`` (a controller's ``driver_env()``) and ``variables``.
    """
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=python_env(**{**(env or {}), **variables}),
        cwd=cwd,
    )


def replica_pids_of(controller_address: str, module: str = "replica") -> list[int]:
    """Replica (or, with ``module="serve._proxy"``, proxy) processes launched by the controller
    at this address, by their command line."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"-m {module} " in cmdline and f"--controller {controller_address}" in cmdline:
            found.append(proc.info["pid"])
    return sorted(found)


def kill_tree(pid: int) -> None:
    """Last-resort cleanup of a process and everything below it."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    # Dead once gone or a zombie, as pids_alive() counts: an orphan's zombie waits for init to
    # reap it, which here takes over a second, and psutil.wait_procs() would wait for that.
    deadline = time.monotonic() + 5.0
    while pids_alive([proc.pid for proc in procs]) and time.monotonic() < deadline:
        time.sleep(0.02)


# A standalone controller's flags for a proxy on its node, on an ephemeral HTTP port.
PROXY_ARGS = ("--proxy-location", "EveryNode", "--http-port", "0")


class StandaloneController:
    """A serve-controller started like an operator would, which a test can kill and restart."""

    def __init__(self, state_dir: Path, *args: str, **env: str) -> None:
        self.state_dir = state_dir
        self.args = args
        self.env = env
        self.ready: dict[str, Any] = {}
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.port = 0

    def start(self) -> Self:
        import json

        self.process = subprocess.Popen(
            [
                *self.python(),
                "-m",
                "controller",
                "--state-dir",
                str(self.state_dir),
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=python_env(**self.env),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the controller died before it was ready"
        ready = self.ready = json.loads(line)
        self.address = ready["address"]
        self.port = int(self.address.rsplit(":", 1)[1])
        return self

    def python(self) -> list[str]:
        """The interpreter command the daemon runs under (a subclass may wrap it)."""
        return [sys.executable]

    def driver_env(self) -> dict[str, str]:
        return {"SERVE_ADDRESS": self.address, "SERVE_STATE_DIR": str(self.state_dir), **self.env}

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def stop(self) -> None:
        """SIGTERM (replicas survive, as after a crash), then clean everything up."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def serve(self, *args: str) -> str:
        """Run a `serve` command against this controller; its stdout (it must succeed)."""
        result = subprocess.run(
            [sys.executable, "-m", "serve", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env=python_env(**self.driver_env()),
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def status(self) -> dict[str, Any]:
        """`serve status --json`."""
        import json

        return json.loads(self.serve("status", "--json"))

    def healthy_proxy(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """This controller's proxy, as `serve status --json` lists it, once it is HEALTHY."""

        def healthy() -> dict[str, Any] | None:
            proxies = list(self.status()["proxies"].values())
            return proxies[0] if proxies and proxies[0]["status"] == "HEALTHY" else None

        return wait_for(healthy, timeout_s=timeout_s, interval_s=0.2)

    def replica_pids(self) -> list[int]:
        """Replica processes launched by this controller, found by their command line."""
        return replica_pids_of(self.address)

    def proxy_pids(self) -> list[int]:
        """Proxy processes (workers included) launched by this controller."""
        return replica_pids_of(self.address, "serve._proxy")

    def cleanup(self) -> None:
        self.stop()
        for pid in [*self.replica_pids(), *self.proxy_pids()]:
            kill_tree(pid)


@contextlib.contextmanager
def running_controller(state_dir: Path, **env: str) -> Iterator[StandaloneController]:
    """A standalone controller (with ``env`` added) for the ``with`` block, cleaned up after."""
    controller = StandaloneController(state_dir, **env)
    try:
        yield controller.start()
    finally:
        controller.cleanup()


def answers(url: str, text: str | None = None, **options: Any) -> bool:
    """Whether GET ``url`` answers 200 (with ``text``, if given) now. A route reaches the
    proxies (and HAProxy) a moment after ``serve.run`` returns, as in Ray: poll this."""
    import httpx

    try:
        reply = httpx.get(url, timeout=10, **options)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200 and (text is None or reply.text == text)


def wait_routed(http_address: str, *prefixes: str, timeout_s: float = 30.0) -> None:
    """Wait until the proxy at ``http_address`` lists these route prefixes in ``/-/routes``,
    without calling an application (a test may count its requests or their spans)."""
    import httpx

    def routed() -> bool:
        try:
            table = httpx.get(f"http://{http_address}/-/routes", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all(prefix in table for prefix in prefixes)

    wait_for(routed, timeout_s=timeout_s, interval_s=0.1)


def proxy_details(timeout_s: float = 30.0) -> Any:
    """This process's serve proxy (``serve.status().proxy_details``), once it is HEALTHY."""
    import serve

    def healthy() -> Any:
        details = list(serve.status().proxy_details.values())
        return details[0] if details and details[0].status == "HEALTHY" else None

    return wait_for(healthy, timeout_s=timeout_s, interval_s=0.1)


def free_port() -> int:
    """A port free on loopback now (for a process that must be told its port up front)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def run_example(
    path: str, tmp_path: Path, port: int | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run an example program in its own process, with its own state directory and a proxy on
    ``port`` (default: a free one)."""
    return subprocess.run(
        [sys.executable, path],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=python_env(
            SERVE_PROXY_LOCATION="EveryNode",
            SERVE_DEFAULT_HTTP_PORT=str(port if port is not None else free_port()),
            SERVE_STATE_DIR=str(tmp_path / "state"),
            **env,
        ),
    )
