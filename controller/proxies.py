"""The controller's proxies: one ``serve-proxy`` on this node, started, watched and replaced
like a replica, and stopped with the cluster.

A proxy tells the controller it is alive by holding its route-table stream (``WatchRoutes``)
and sending a heartbeat on it every ``SERVE_HEARTBEAT_PERIOD_S`` from its event loop. One
silent for ``SERVE_HEARTBEAT_TIMEOUT_S`` (stopped, its loop stuck, its host cut off) is killed
and replaced. Its liveness never goes through its public HTTP port: a proxy flooded with
connections (over its connection cap), but whose loop still runs, is alive and is kept. A proxy
that exits is replaced after a backoff (0.5 s doubling to 30 s, reset once one has served for a
while), and ``serve status`` says why. A proxy that outlived a controller restart re-links
within ``ADOPT_WAIT_S`` and is kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

from controller.launcher import PidReplica, finished_within, kill_pid, pid_alive
from serve._models import ProxyInfo
from serve._settings import ADDRESS_ENV, TOKEN_ENV, settings
from serve.config import ProxyLocation

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a proxy that served this long resets the restart backoff
ADOPT_WAIT_S = 5.0
RECORD_FILE = "proxy.json"


@dataclasses.dataclass
class ProxyState:
    """One node's proxy, as ``serve status`` shows it."""

    node_id: str
    status: str = "STARTING"
    message: str = ""
    pid: int = 0
    http_address: str = ""
    grpc_address: str = ""


class ProxyManager:
    """Keeps this node's proxy running while the controller runs."""

    def __init__(
        self,
        *,
        location: ProxyLocation,
        flags: list[str],
        controller_address: str,
        token: str,
        node_id: str,
        state_dir: Path,
        log_dir: Path | None,
    ) -> None:
        self.location = location
        self._flags = flags
        self._controller_address = controller_address
        self._token = token
        self._node_id = node_id
        self._record = state_dir / RECORD_FILE
        self._log_dir = log_dir
        self.state = ProxyState(node_id)
        self._process: asyncio.subprocess.Process | None = None
        self._linked = asyncio.Event()
        self._silent = asyncio.Event()  # the current proxy stopped heartbeating
        self._task: asyncio.Task[None] | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=5)

    @property
    def enabled(self) -> bool:
        return self.location is not ProxyLocation.Disabled

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._supervise(), name="controller:proxy")

    async def aclose(self, *, stop_proxy: bool) -> None:
        """Stop supervising; with ``stop_proxy`` stop the proxy too (else it outlives us)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if stop_proxy:
            await self._stop_process()
            with contextlib.suppress(OSError):
                self._record.unlink()

    def statuses(self) -> list[ProxyState]:
        return [self.state] if self.enabled else []

    # What the servicer reports.

    def linked(self, info: ProxyInfo) -> None:
        if info.node_id != self._node_id:
            return
        state = self.state
        state.pid, state.http_address, state.grpc_address = (
            info.pid,
            info.http_address,
            info.grpc_address,
        )
        state.status, state.message = "HEALTHY", ""
        self._linked.set()

    def unlinked(self, info: ProxyInfo) -> None:
        if info.node_id == self._node_id and info.pid == self.state.pid:
            self._linked.clear()

    def silent(self, info: ProxyInfo) -> None:
        """The proxy sent nothing on its stream for the heartbeat timeout: it is replaced."""
        if info.node_id == self._node_id and info.pid == self.state.pid:
            logger.warning(
                "serve-proxy pid %d sent no heartbeat for %.0fs (SERVE_HEARTBEAT_TIMEOUT_S); "
                "replacing it",
                info.pid,
                settings().heartbeat_timeout_s,
            )
            self._silent.set()

    # Supervision.

    async def _supervise(self) -> None:
        await self._adopt_previous()
        delay_s = 0.5
        while True:
            started = time.monotonic()
            try:
                if self.state.pid and self._process is None:
                    await self._watch_adopted(self.state.pid)
                else:
                    await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("Proxy supervision failed")
                self._unhealthy(str(exc))
            self.state.pid = 0
            if time.monotonic() - started > STABLE_S:
                delay_s = 0.5
            logger.warning(
                "serve-proxy is down (%s); starting another in %.1fs", self.state.message, delay_s
            )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, BACKOFF_MAX_S)

    async def _adopt_previous(self) -> None:
        """A proxy the last controller started, still alive, re-links to us: keep it."""
        try:
            record = json.loads(self._record.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if not pid_alive(pid):
            return
        try:
            async with asyncio.timeout(ADOPT_WAIT_S):
                await self._linked.wait()
        except TimeoutError:
            logger.warning("The previous serve-proxy (pid %d) did not re-link; replacing it", pid)
            kill_pid(pid)
            return
        logger.info("Re-adopted serve-proxy pid %d", self.state.pid)

    async def _run_once(self) -> None:
        self.state.status, self.state.message = "STARTING", ""
        self._linked.clear()
        self._silent.clear()
        env = dict(os.environ)
        env[TOKEN_ENV] = self._token
        env.pop(ADDRESS_ENV, None)
        command = [sys.executable, "-P", "-m", "serve._proxy", "--controller"]
        command += [self._controller_address, "--node-id", self._node_id, *self._flags]
        if self._log_dir is not None:
            command += ["--log-file", str(self._log_dir / "proxy.log")]
        process = self._process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        drain = asyncio.create_task(self._drain_stderr(process), name="controller:proxy-stderr")
        try:
            ready = await self._read_ready(process)
            killed = ""
            if ready is not None:
                self.state.pid = process.pid
                self.state.http_address = str(ready.get("http", ""))
                self.state.grpc_address = str(ready.get("grpc", ""))
                self._record.write_text(json.dumps({"pid": process.pid}))
                self._record.chmod(0o600)
                killed = await self._watch(process)
            code = await process.wait()
            await asyncio.wait_for(asyncio.shield(drain), 1.0)
            self._unhealthy(killed or self._exit_reason(code))
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            drain.cancel()
            self._process = None

    async def _read_ready(self, process: asyncio.subprocess.Process) -> dict[str, object] | None:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                while line := await process.stdout.readline():
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if isinstance(event, dict) and event.get("event") == "ready":
                            return event
        except TimeoutError:
            self._unhealthy(f"not ready within {READY_TIMEOUT_S:.0f}s")
            process.kill()
        return None

    async def _watch(self, process: asyncio.subprocess.Process) -> str:
        """Until the process exits, or falls silent (killed: why)."""
        if not await self._silent_before(process.wait()):
            return ""
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return f"{self.state.message}; killed"

    async def _watch_adopted(self, pid: int) -> None:
        adopted = PidReplica(pid)
        if await self._silent_before(adopted.wait()):
            adopted.kill()
            await adopted.wait()
            self._unhealthy(f"pid {pid} {self.state.message}; killed")
            return
        self._unhealthy(f"pid {pid} exited (not a child of this controller)")

    async def _silent_before(self, exit_: Awaitable[object]) -> bool:
        """Wait for the proxy to exit; True if it fell silent first (or never linked within
        the heartbeat timeout of being ready)."""
        timeout_s = settings().heartbeat_timeout_s
        loop = asyncio.get_running_loop()
        exited = loop.create_task(_wait(exit_), name="controller:proxy:exit")
        silent = loop.create_task(self._silent_or_unlinked(timeout_s), name="controller:proxy:live")
        try:
            await asyncio.wait({exited, silent}, return_when=asyncio.FIRST_COMPLETED)
            return not exited.done()
        finally:
            for task in (exited, silent):
                task.cancel()
            await asyncio.gather(exited, silent, return_exceptions=True)

    async def _silent_or_unlinked(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._linked.wait()
        except TimeoutError:
            logger.warning("serve-proxy did not link within %.0fs; replacing it", timeout_s)
            self.state.message = f"did not link within {timeout_s:g}s"
            return
        await self._silent.wait()
        self.state.message = f"sent no heartbeat for {timeout_s:g}s"

    async def _drain_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                self._stderr_tail.append(text)

    def _exit_reason(self, code: int) -> str:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        last = self._stderr_tail[-1] if self._stderr_tail and code > 0 else ""
        return f"{how}: {last}" if last else how

    def _unhealthy(self, message: str) -> None:
        self.state.status, self.state.message = "UNHEALTHY", message
        self._linked.clear()

    async def _stop_process(self) -> None:
        process = self._process
        pid = process.pid if process is not None else self.state.pid
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            if not await finished_within(process.wait(), STOP_TIMEOUT_S):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        elif pid and pid_alive(pid):  # adopted: not our child
            await PidReplica(pid).stop(STOP_TIMEOUT_S)
        self.state = ProxyState(self._node_id, status="DRAINING")


async def _wait(awaitable: Awaitable[object]) -> None:
    await awaitable
