"""The controller's proxies: one ``serve-proxy`` on this node (the head), and with
``EveryNode`` on a cluster one on every node that runs replicas (``controller.node_proxies``);
each started, watched and replaced like a replica, and stopped with the cluster.

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
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from controller.launcher import PidReplica, finished_within, kill_pid, pid_alive
from controller.proxy_watch import ProxyState, ProxyWatch, keep_running
from serve._models import ProxyInfo
from serve._settings import ADDRESS_ENV, TOKEN_ENV, settings
from serve.config import ProxyLocation

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
ADOPT_WAIT_S = 5.0
RECORD_FILE = "proxy.json"


class OtherProxies(Protocol):
    """The proxies on other nodes (EveryNode on a cluster), behind the head's manager."""

    def start(self) -> None: ...

    async def aclose(self, *, stop_proxies: bool) -> None: ...

    def statuses(self) -> list[ProxyState]: ...

    def watch_of(self, node_id: str) -> ProxyWatch | None: ...


class ProxyManager:
    """Keeps this node's proxy running while the controller runs (and, through ``others``,
    the proxies of other nodes); the servicer reports every proxy's link here."""

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
        others: OtherProxies | None = None,
    ) -> None:
        self.location = location
        self._flags = flags
        self._controller_address = controller_address
        self._token = token
        self._node_id = node_id
        self._record = state_dir / RECORD_FILE
        self._log_dir = log_dir
        self._others = others
        self.watch = ProxyWatch(node_id)
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False  # aclose() began: the proxy is stopped by it, or outlives us
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=5)

    @property
    def enabled(self) -> bool:
        return self.location is not ProxyLocation.Disabled

    @property
    def state(self) -> ProxyState:
        return self.watch.state

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._supervise(), name="controller:proxy")
        if self._others is not None:
            self._others.start()

    async def aclose(self, *, stop_proxy: bool) -> None:
        """Stop supervising; with ``stop_proxy`` stop the proxies too (else they outlive us)."""
        if self._others is not None:
            await self._others.aclose(stop_proxies=stop_proxy)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if stop_proxy:
            await self._stop_process()
            with contextlib.suppress(OSError):
                self._record.unlink()

    @property
    def https(self) -> bool:
        """Whether the proxies serve HTTPS (http_options' ssl_keyfile and ssl_certfile)."""
        return "--http-ssl-certfile" in self._flags

    def statuses(self) -> list[ProxyState]:
        head = [self.state] if self.enabled else []
        return head + (self._others.statuses() if self._others is not None else [])

    # What the servicer reports, for the proxy of any node.

    def _watch_of(self, node_id: str) -> ProxyWatch | None:
        if node_id == self._node_id:
            return self.watch
        return self._others.watch_of(node_id) if self._others is not None else None

    def linked(self, info: ProxyInfo) -> None:
        watch = self._watch_of(info.node_id)
        if watch is not None:
            watch.linked(info)

    def unlinked(self, info: ProxyInfo) -> None:
        watch = self._watch_of(info.node_id)
        if watch is not None:
            watch.unlinked(info)

    def silent(self, info: ProxyInfo) -> None:
        """The proxy sent nothing on its stream for the heartbeat timeout: it is replaced."""
        watch = self._watch_of(info.node_id)
        if watch is not None:
            watch.silent(info, settings().heartbeat_timeout_s)

    # Supervision of this node's proxy.

    async def _supervise(self) -> None:
        await self._adopt_previous()
        await keep_running(self._run_or_watch_adopted, self.watch)

    async def _run_or_watch_adopted(self) -> None:
        if self.state.pid and self._process is None:
            await self._watch_adopted(self.state.pid)
        else:
            await self._run_once()

    async def _adopt_previous(self) -> None:
        """A proxy the last controller started, still alive, re-links to us: keep it."""
        try:
            record = json.loads(self._record.read_text())
            pid = int(record["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if not pid_alive(pid):
            return
        if not await self.watch.wait_linked(ADOPT_WAIT_S):
            logger.warning("The previous serve-proxy (pid %d) did not re-link; replacing it", pid)
            kill_pid(pid)
            return
        logger.info("Re-adopted serve-proxy pid %d", self.state.pid)

    async def _run_once(self) -> None:
        self.watch.starting()
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
                killed = await self.watch.silent_before(
                    process.wait(), settings().heartbeat_timeout_s
                )
                if killed:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            code = await process.wait()
            await asyncio.wait_for(asyncio.shield(drain), 1.0)
            self.watch.unhealthy(f"{killed}; killed" if killed else self._exit_reason(code))
        finally:
            drain.cancel()
            if not self._closing:  # else aclose() stops it gently (its cleanup runs) or not
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
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
            self.watch.unhealthy(f"not ready within {READY_TIMEOUT_S:.0f}s")
            process.kill()
        return None

    async def _watch_adopted(self, pid: int) -> None:
        adopted = PidReplica(pid)
        killed = await self.watch.silent_before(adopted.wait(), settings().heartbeat_timeout_s)
        if killed:
            adopted.kill()
            await adopted.wait()
            self.watch.unhealthy(f"pid {pid} {killed}; killed")
            return
        self.watch.unhealthy(f"pid {pid} exited (not a child of this controller)")

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
        self.watch.state = ProxyState(self._node_id, status="DRAINING")
