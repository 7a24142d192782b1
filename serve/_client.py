"""The process's link to serve: which controller, its token, and every router's shared state.

A driver finds its controller in this order: ``serve.start(address=...)``, ``SERVE_ADDRESS``, a
standalone controller recorded in the state directory, else an embedded controller it starts and
owns (it stops, with its replicas, when this process exits or calls ``serve.shutdown()``; a
killed driver closes the controller's stdin, which stops it too). A replica is handed its
controller on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve._exchange import ConnectionLost
from serve._models import DeploymentID, ReplicaInfo
from serve._routing_state import RoutingState
from serve._rpc.channel import TlsFiles, tls_from_settings
from serve._rpc.connection import ReplicaConnection
from serve._rpc.controller_client import ControllerClient
from serve._settings import TOKEN_ENV, settings
from serve._state_dir import read_token, recorded_controller
from serve._sync import run_sync
from serve.exceptions import ControllerUnavailableError

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


class ServeClient:
    """Lives on the home loop. Constructed there by :func:`connect` or by the replica."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None,
        tls: TlsFiles | None,
        owner: EmbeddedController | None,
    ) -> None:
        self.address = address
        self.token = token
        self.tls = tls
        self.owner = owner
        self.controller = ControllerClient(address, token=token, tls=tls)
        self.host = settings().node_id
        self.load_source = f"handle:{self.host}:{os.getpid()}"
        self._states: dict[DeploymentID, RoutingState] = {}
        self._closed = False

    async def __aenter__(self) -> ServeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def routing_state(self, deployment_id: DeploymentID) -> RoutingState:
        state = self._states.get(deployment_id)
        if state is None:
            state = RoutingState(
                deployment_id,
                watch=self.controller.watch,
                open_connection=self._open_connection,
                local_host=self.host,
                report=self._report_load,
                report_interval_s=settings().metrics_interval_s,
            )
            self._states[deployment_id] = state
            state.start()
        return state

    async def _report_load(
        self, deployment_id: DeploymentID, queued: float, requests_total: int
    ) -> None:
        await self.controller.report_handle_load(
            deployment_id, self.load_source, queued, requests_total
        )

    def _open_connection(
        self,
        replica: ReplicaInfo,
        on_load: Callable[[int, int], None],
        on_broken: Callable[[Any, ConnectionLost], None],
    ) -> ReplicaConnection:
        return ReplicaConnection(
            replica.replica_id,
            replica.address,
            token=self.token,
            tls=self.tls,
            on_load=on_load,
            on_broken=on_broken,
        )

    async def aclose(self) -> None:
        """Close every router's state and the controller channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        states = list(self._states.values())
        self._states.clear()
        await asyncio.gather(*(s.aclose() for s in states), return_exceptions=True)
        await self.controller.aclose()


class EmbeddedController:
    """A serve-controller subprocess owned by this driver. Start one with :meth:`start`."""

    def __init__(self, process: subprocess.Popen[bytes], state_dir: Path, token: str) -> None:
        self.process = process
        self.state_dir = state_dir
        self.token = token
        self.address = ""

    @classmethod
    def start(
        cls, extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None
    ) -> EmbeddedController:
        """Start the daemon (with ``extra_env`` added to its environment, which its replicas
        inherit) and wait (bounded) for its READY line."""
        state_dir = Path(tempfile.mkdtemp(prefix="serve-"))
        token = secrets.token_urlsafe(32)
        env = {**os.environ, **(extra_env or {})}
        env[TOKEN_ENV] = token
        env.pop("SERVE_ADDRESS", None)
        # Logs outlive the embedded controller's private state directory: one directory per
        # session under SERVE_STATE_DIR/logs (as Ray keeps /tmp/ray/session_*/logs).
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        log_dir = settings().state_dir / "logs" / f"session_{stamp}_{os.getpid()}"
        port = settings().dashboard_port  # on loopback: it answers only this machine
        dashboard_args = [] if port is None else ["--metrics-port", str(port)]
        process = subprocess.Popen(
            [
                sys.executable,
                "-P",  # the daemon's own modules, never a `controller.py` in the working dir
                "-m",
                "controller",
                "--state-dir",
                str(state_dir),
                "--embedded",
                "--log-dir",
                str(log_dir),
                *dashboard_args,
                *(extra_args or []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches the driver, not the daemon
        )
        owner = cls(process, state_dir, token)
        try:
            owner.address = str(read_ready_line(process, READY_TIMEOUT_S)["address"])
        except BaseException:
            owner.kill()
            raise
        return owner

    def stop(self, timeout_s: float) -> None:
        """Close its stdin (it shuts down its replicas and exits); kill it after timeout_s."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self.cleanup()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.cleanup()

    def cleanup(self) -> None:
        if self.process.stdout is not None:
            self.process.stdout.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def read_ready_line(process: subprocess.Popen[bytes], timeout_s: float) -> dict[str, object]:
    """Wait for a daemon's READY JSON line on stdout (bounded), or explain why it never came."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    fd = process.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], min(0.1, max(deadline - time.monotonic(), 0)))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("event") == "ready":
                    return event
        elif process.poll() is not None:
            break
    code = process.poll()
    if code is not None:
        raise ControllerUnavailableError(
            f"serve-controller exited with code {code} before it was ready; see its log above."
        )
    raise ControllerUnavailableError(f"serve-controller was not ready within {timeout_s}s.")


def _token_for(state_dir: Path) -> str | None:
    return settings().token or read_token(state_dir)


_lock = threading.Lock()
_client: ServeClient | None = None


def current() -> ServeClient | None:
    return _client


def install(client: ServeClient) -> None:
    """Make ``client`` the process's client (replicas, at start-up)."""
    global _client
    _client = client


def connect(
    address: str | None = None,
    *,
    start_embedded: bool = True,
    controller_args: list[str] | None = None,
    controller_env: dict[str, str] | None = None,
) -> ServeClient:
    """The process's client, connecting (or starting an embedded controller) on first use.

    ``controller_args`` are flags for an embedded controller (``serve.start``'s proxy options)
    and ``controller_env`` environment variables for it (``controller_options``, logging); a
    controller that already runs keeps its own, with a warning."""
    global _client
    with _lock:
        if _client is not None:
            if controller_args or controller_env:
                _options_ignored(_client.address)
            if address is not None and address != _client.address:
                raise ValueError(
                    f"Already connected to the controller at {_client.address}; call "
                    "serve.shutdown() before connecting to another one."
                )
            return _client
        s = settings()
        owner: EmbeddedController | None = None
        token = _token_for(s.state_dir)
        found = address or s.address or recorded_controller(s.state_dir)
        if found is None:
            if not start_embedded:
                raise ControllerUnavailableError(
                    "No serve controller is running; call serve.run() or serve.start() first."
                )
            owner = EmbeddedController.start(controller_args, controller_env)
            found, token = owner.address, owner.token
        elif controller_args or controller_env:
            _options_ignored(found)
        target: str = found
        tls = tls_from_settings()

        async def build() -> ServeClient:
            client = ServeClient(target, token=token, tls=tls, owner=owner)
            await client.controller.wait_ready(timeout_s=10.0)
            return client

        try:
            client = run_sync(build())
        except BaseException:
            if owner is not None:
                owner.kill()
            raise
        _client = client
        return client


def _options_ignored(address: str) -> None:
    logger.warning(
        "serve is already running (controller at %s): its options stay as they are; the "
        "http_options, grpc_options, proxy_location, logging_config and controller_options "
        "given now are ignored. Restart "
        "serve (serve.shutdown(), or `serve shutdown` for a standalone controller) to change "
        "them.",
        address,
    )


def disconnect(timeout_s: float = 60.0) -> ServeClient | None:
    """Forget the process's client, closing its routers; returns it (for the owner's cleanup)."""
    global _client
    with _lock:
        client, _client = _client, None
    if client is not None:
        with contextlib.suppress(Exception):
            run_sync(client.aclose(), timeout_s)
    return client
