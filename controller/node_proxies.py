"""``proxy_location="EveryNode"`` on a cluster: a serve-proxy on every node that runs replicas.

Each is a job of the launcher, like a replica (under Slurm: one task, 1 CPU, pinned to its node
with ``--nodelist``), so the cluster manager accounts for it. It binds the node's own address
(or the wildcard, if that is what the proxy options say), routes to every replica and prefers
those on its node, links and heartbeats like the head's proxy (``controller.proxy_watch``), and
is replaced when it dies or falls silent. A node's proxy is started when a replica first runs
there and stopped when the node's last replica goes. After a controller restart the proxies
still running are re-adopted; none is stopped until the replicas have re-linked (until then
nobody knows which nodes run replicas).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from controller.launcher import Launched
from controller.proxy_watch import ProxyState, ProxyWatch, keep_running
from serve._task_owner import guarded

logger = logging.getLogger(__name__)

LINK_TIMEOUT_S = 60.0  # a proxy job that runs must link by then (interpreter start included)
ADOPT_WAIT_S = 5.0  # a proxy of the last controller must re-link by then
STOP_TIMEOUT_S = 5.0
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD = ("0.0.0.0", "::", "")


@runtime_checkable
class ProxyLauncher(Protocol):
    """What a launcher offers to run proxies on its nodes (SlurmLauncher does)."""

    async def launch_proxy(
        self, node: str, command: Sequence[str], on_pending: Callable[[str], None]
    ) -> Launched: ...

    async def adopt_proxies(self) -> Mapping[str, Launched]: ...


def node_proxy_command(
    controller_address: str, flags: Sequence[str], log_dir: Path | None, node: str
) -> list[str]:
    """The serve-proxy command of a node's proxy: the head's flags, except that an address of
    the controller's host becomes ``auto`` (the node's own address on the route to the
    controller). A wildcard or loopback host stays as it is. The node id comes from the job's
    environment (SERVE_NODE_ID)."""
    command = [sys.executable, "-P", "-m", "serve._proxy", "--controller", controller_address]
    args = list(flags)
    for i, flag in enumerate(args[:-1]):
        if flag == "--http-host" and args[i + 1] not in (*_LOOPBACK, *_WILDCARD):
            args[i + 1] = "auto"
    command += args
    if log_dir is not None:
        command += ["--log-file", str(log_dir / f"proxy_{node}.log")]
    return command


@dataclasses.dataclass(eq=False)
class _NodeProxy:
    watch: ProxyWatch
    job: Launched | None = None
    adopted: bool = False  # its job ran under the last controller
    task: asyncio.Task[None] | None = None


class NodeProxies:
    """The proxies of the nodes that run replicas (the head's own proxy is not one of them)."""

    def __init__(
        self,
        *,
        launcher: ProxyLauncher,
        command: Callable[[str], list[str]],
        nodes: Callable[[], set[str] | None],
        changed: Callable[[], Awaitable[None]],
    ) -> None:
        self._launcher = launcher
        self._command = command
        self._nodes = nodes
        self._changed = changed
        self._proxies: dict[str, _NodeProxy] = {}
        self._watches: dict[str, ProxyWatch] = {}  # links are reported before adoption too
        # Each proxy's supervision and each stop is a child of the group _run enters.
        self._group: asyncio.TaskGroup | None = None
        self._following: asyncio.Task[None] | None = None  # adopting, then reconciling
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="controller:node-proxies")

    async def aclose(self, *, stop_proxies: bool) -> None:
        """Stop supervising; with ``stop_proxies`` stop them too (else they re-link to the
        next controller). Stops already under way finish first."""
        tasks = [p.task for p in self._proxies.values() if p.task is not None]
        if self._following is not None:
            tasks.append(self._following)
        elif self._task is not None:  # started, not yet running: it never will
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if stop_proxies:
            jobs = [p.job for p in self._proxies.values() if p.job is not None]
            await asyncio.gather(*(job.stop(STOP_TIMEOUT_S) for job in jobs))
        if self._task is not None:  # its group ends once the stops in it have finished
            await asyncio.wait([self._task])
        self._proxies.clear()

    def statuses(self) -> list[ProxyState]:
        return [self._proxies[node].watch.state for node in sorted(self._proxies)]

    def watch_of(self, node_id: str) -> ProxyWatch | None:
        if node_id not in self._watches:
            self._watches[node_id] = ProxyWatch(node_id)
        return self._watches[node_id]

    async def _run(self) -> None:
        """The owner: every proxy's task is a child of its group. Ends when ``aclose()``
        cancels the following, after the stops under way."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._following = group.create_task(
                guarded(self._follow(), logger), name="controller:node-proxies:follow"
            )

    async def _follow(self) -> None:
        try:
            adopted = await self._launcher.adopt_proxies()
        except Exception as exc:  # the cluster manager cannot say: start afresh where needed
            logger.warning("Could not look for the proxies of the last controller: %s", exc)
            adopted = {}
        for node, job in adopted.items():
            logger.info("Re-adopting the serve-proxy of node %s (%s)", node, job.ident)
            self._begin(node, job)
        while True:
            self._reconcile()
            await self._changed()

    def _reconcile(self) -> None:
        wanted = self._nodes()
        if wanted is None:  # replicas are still re-linking after a restart
            return
        for node in sorted(wanted - self._proxies.keys()):
            logger.info("Node %s runs replicas: starting its serve-proxy", node)
            self._begin(node, None)
        for node in sorted(self._proxies.keys() - wanted):
            logger.info("Node %s runs no replica any more: stopping its serve-proxy", node)
            self._end(node)

    def _begin(self, node: str, job: Launched | None) -> None:
        watch = self.watch_of(node)
        assert watch is not None
        proxy = self._proxies[node] = _NodeProxy(watch, job, adopted=job is not None)
        assert self._group is not None  # called from _follow, a child of the group
        proxy.task = self._group.create_task(
            guarded(keep_running(lambda: self._run_once(node, proxy), proxy.watch), logger),
            name=f"controller:node-proxy:{node}",
        )

    def _end(self, node: str) -> None:
        proxy = self._proxies.pop(node)
        assert self._group is not None
        self._group.create_task(
            guarded(self._stop(proxy), logger), name=f"controller:node-proxy-stop:{node}"
        )

    async def _stop(self, proxy: _NodeProxy) -> None:
        if proxy.task is not None:
            proxy.task.cancel()
            await asyncio.gather(proxy.task, return_exceptions=True)
        if proxy.job is not None:
            await proxy.job.stop(STOP_TIMEOUT_S)

    async def _run_once(self, node: str, proxy: _NodeProxy) -> None:
        watch = proxy.watch
        adopted, proxy.adopted = proxy.adopted, False
        if not adopted:  # an adopted proxy may have re-linked already: keep what it said
            watch.starting()

        def pending(reason: str) -> None:
            watch.state.message = reason

        if proxy.job is None:
            proxy.job = await self._launcher.launch_proxy(node, self._command(node), pending)
        job = proxy.job
        if await job.running() is None:
            proxy.job = None
            watch.unhealthy((await job.wait()).reason)
            return
        killed = await watch.silent_before(job.wait(), ADOPT_WAIT_S if adopted else LINK_TIMEOUT_S)
        if killed:
            job.kill()
        ended = await job.wait()
        proxy.job = None
        watch.unhealthy(f"{killed}; killed" if killed else ended.reason)
