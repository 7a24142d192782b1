"""What the controller knows of one serve-proxy, wherever it runs: its status as ``serve status``
shows it, whether it is linked, whether it fell silent, and the restart loop around it.

A proxy is alive while it holds its route-table stream and heartbeats on it (see
``controller.liveness``): never judged by its public port, which a flood may saturate while its
loop runs fine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from serve._models import ProxyInfo

logger = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0  # a proxy that served this long resets the restart backoff


@dataclasses.dataclass
class ProxyState:
    """One node's proxy, as ``serve status`` shows it."""

    node_id: str
    status: str = "STARTING"
    message: str = ""
    pid: int = 0
    http_address: str = ""
    grpc_address: str = ""


class ProxyWatch:
    """One node's proxy: the servicer reports its link, its silence and its unlinking here;
    the supervising task waits on it."""

    def __init__(self, node_id: str) -> None:
        self.state = ProxyState(node_id)
        self._linked = asyncio.Event()
        self._silent = asyncio.Event()

    def starting(self) -> None:
        self.state.status, self.state.message = "STARTING", ""
        self._linked.clear()
        self._silent.clear()

    def linked(self, info: ProxyInfo) -> None:
        state = self.state
        state.pid, state.http_address, state.grpc_address = (
            info.pid,
            info.http_address,
            info.grpc_address,
        )
        state.status, state.message = "HEALTHY", ""
        self._linked.set()

    def unlinked(self, info: ProxyInfo) -> None:
        if info.pid == self.state.pid:
            self._linked.clear()

    def silent(self, info: ProxyInfo, timeout_s: float) -> None:
        if info.pid == self.state.pid:
            logger.warning(
                "serve-proxy on %s (pid %d) sent no heartbeat for %.0fs "
                "(SERVE_HEARTBEAT_TIMEOUT_S); replacing it",
                self.state.node_id,
                info.pid,
                timeout_s,
            )
            self._silent.set()

    async def wait_linked(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._linked.wait()
        except TimeoutError:
            return False
        return True

    def unhealthy(self, message: str) -> None:
        self.state.status, self.state.message = "UNHEALTHY", message
        self._linked.clear()

    async def silent_before(self, exit_: Awaitable[object], link_timeout_s: float) -> str:
        """Wait for the proxy to exit: "" if it did, else why it must be killed (it did not link
        within ``link_timeout_s``, or it fell silent)."""
        loop = asyncio.get_running_loop()
        exited = loop.create_task(_wait(exit_), name="controller:proxy:exit")
        silent = loop.create_task(
            self._silent_or_unlinked(link_timeout_s), name="controller:proxy:live"
        )
        try:
            await asyncio.wait({exited, silent}, return_when=asyncio.FIRST_COMPLETED)
            return "" if exited.done() else silent.result()
        finally:
            for task in (exited, silent):
                task.cancel()
            await asyncio.gather(exited, silent, return_exceptions=True)

    async def _silent_or_unlinked(self, timeout_s: float) -> str:
        if not await self.wait_linked(timeout_s):
            logger.warning(
                "serve-proxy on %s did not link within %.0fs; replacing it",
                self.state.node_id,
                timeout_s,
            )
            return f"did not link within {timeout_s:g}s"
        await self._silent.wait()
        return "sent no heartbeat (SERVE_HEARTBEAT_TIMEOUT_S)"


async def keep_running(run_once: Callable[[], Awaitable[None]], watch: ProxyWatch) -> None:
    """Run the proxy again each time it ends, after a backoff (0.5 s doubling to 30 s, reset
    once one served for STABLE_S); ``serve status`` says why it is down meanwhile."""
    delay_s = BACKOFF_START_S
    while True:
        started = time.monotonic()
        try:
            await run_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("Proxy supervision failed")
            watch.unhealthy(str(exc))
        watch.state.pid = 0
        if time.monotonic() - started > STABLE_S:
            delay_s = BACKOFF_START_S
        logger.warning(
            "serve-proxy on %s is down (%s); starting another in %.1fs",
            watch.state.node_id,
            watch.state.message,
            delay_s,
        )
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, BACKOFF_MAX_S)


async def _wait(awaitable: Awaitable[object]) -> None:
    await awaitable
