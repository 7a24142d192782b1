"""What serve's daemons share about staying alive: how long one has been without its
controller (it exits after ``orphan_timeout_s`` alone, so nothing leaks), and the watch that
stops a process when its owner closes its stdin (or dies).

The clock starts when the loss is noticed: a stream that breaks, or one that falls silent for
``SERVE_HEARTBEAT_TIMEOUT_S`` (a network cut breaks nothing; see ``serve._rpc.controller_client``).
Each attempt to reach the controller again is bounded by the time left (``remaining_s``), so a
daemon cut off from its controller exits on time even while a connection attempt hangs."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

RETRY_START_S = 0.1
RETRY_MAX_S = 1.0


class OrphanClock:
    """Call :meth:`linked` while the controller answers, :meth:`orphaned` after each loss (True
    once ``orphan_timeout_s`` passed without it), and :meth:`pause` before trying again."""

    def __init__(self, controller_address: str, orphan_timeout_s: float, *, lost: bool) -> None:
        self._address = controller_address
        self._timeout_s = orphan_timeout_s
        self._lost_since = time.monotonic() if lost else 0.0
        self._delay_s = RETRY_START_S

    def linked(self) -> None:
        self._lost_since = 0.0
        self._delay_s = RETRY_START_S

    def remaining_s(self) -> float | None:
        """How long an attempt to (re)link may take before the orphan timeout (None: linked)."""
        if not self._lost_since:
            return None
        return max(0.0, self._timeout_s - (time.monotonic() - self._lost_since))

    def orphaned(self) -> bool:
        now = time.monotonic()
        if not self._lost_since:
            self._lost_since = now
            logger.warning("Lost the controller at %s", self._address)
        alone_s = now - self._lost_since
        if alone_s > self._timeout_s:
            logger.warning("No controller for %.0fs (orphan_timeout_s); exiting", alone_s)
            return True
        return False

    async def pause(self) -> None:
        await asyncio.sleep(self._delay_s)
        self._delay_s = min(self._delay_s * 2, RETRY_MAX_S)


def route_address(controller_address: str) -> str:
    """This node's address on the route to the controller: what peers on other nodes reach
    (what a daemon given the host ``auto`` binds, or advertises when it binds a wildcard).

    A UDP "connect" sends nothing; it only asks the kernel which local address it would use.
    """
    import socket

    host = controller_address.rsplit(":", 1)[0].strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        address: str = probe.getsockname()[0]
    return address


def on_stdin_closed(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Call ``callback`` on ``loop`` once stdin reaches end of file: the process that holds its
    other end closed it, or died."""
    fd = sys.stdin.fileno()

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            callback()

    loop.add_reader(fd, on_readable)
