"""Starting replica processes: the launcher contract, and ``LocalProcessLauncher``, which runs
``serve-replica`` subprocesses on this host.

The contract is the same for every engine (local processes, Slurm jobs, later Kubernetes pods):

- ``launch(replica_id, request, on_pending)`` places a replica with its resources and placement
  constraints and returns a ``Launched`` handle at once; while the engine cannot place it,
  ``on_pending(reason)`` says why (shown by ``serve status``, as Ray shows pending actors).
  ``launch_gang(gang, request, on_pending)`` places a gang's members together or not at all
  (one ``Launched`` each; under Slurm they share one job) and hands each its gang context.
- ``Launched.running()`` returns once the process runs (its pid, 0 when it runs on another
  host), or None if it ended first; ``wait()`` returns its ``Exit`` (exit or loss, including a
  replica that dies, or is cancelled, before it ever links); ``stop(grace_s)`` signals it,
  waits ``grace_s``, then kills it; ``kill()`` kills it now.
- ``adopt(replica_id, pid, request)`` finds a replica the previous controller launched (None
  if gone), and holds what it asked for again (``request``, kept in the state database).

Replicas always link back to the controller themselves; the engine's own state only reports
what happens to a process, never its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from controller.resources import GangSpec, Grant, NodeCapacity, ResourceRequest
from serve._settings import ADDRESS_ENV, TOKEN_ENV

logger = logging.getLogger(__name__)

PID_POLL_S = 0.2  # how often a replica this process did not start is checked for exit


@dataclasses.dataclass(frozen=True)
class Exit:
    """How a launched replica ended: its exit code when known, and what happened."""

    code: int | None
    reason: str = ""
    node: str = ""  # where it ran, when the engine says (a Slurm job's node)


class Launched(Protocol):
    """One launched replica: a child process, a cluster job, a pod."""

    @property
    def ident(self) -> str:  # for logs: "pid 4242", "Slurm job 17"
        ...

    async def running(self) -> int | None: ...

    async def wait(self) -> Exit: ...

    async def stop(self, grace_s: float) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Places replicas that link back to the controller by themselves."""

    async def launch(
        self, replica_id: str, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> Launched: ...

    async def launch_gang(
        self, gang: GangSpec, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> Sequence[Launched]:
        """Place a gang's members (each asks for ``request``) together or not at all; one
        ``Launched`` per member, by rank."""
        ...

    async def adopt(
        self, replica_id: str, pid: int, request: ResourceRequest
    ) -> Launched | None: ...

    async def aclose(self) -> None: ...


def replica_command(
    controller_address: str,
    replica_id: str,
    host: str,
    log_dir: Path | None,
    gang: Mapping[str, object] | None = None,
) -> list[str]:
    """The ``serve-replica`` command line (a gang member's with its gang context): never the
    token (it travels in the environment)."""
    command = [
        sys.executable,
        "-P",  # the daemon's own modules, never a `replica` package in the working dir
        "-m",
        "replica",
        "--controller",
        controller_address,
        "--replica-id",
        replica_id,
        "--host",
        host,
    ]
    if log_dir is not None:
        command += ["--log-file", str(replica_log_file(log_dir, replica_id))]
    if gang is not None:
        command += ["--gang", json.dumps(gang, separators=(",", ":"))]
    return command


def replica_log_file(log_dir: Path, replica_id: str) -> Path:
    """Where a replica (``app#deployment#tag``) started with logs in ``log_dir`` writes."""
    safe = replica_id.replace("#", "_").replace("/", "_")
    return log_dir / f"replica_{safe}.log"


class LocalReplica:
    """A replica process on this host, started once the node has room for it."""

    def __init__(self, replica_id: str) -> None:
        self.ident = f"replica {replica_id} (pending)"
        self._process: asyncio.subprocess.Process | None = None
        self._started: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._ended: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    def started(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.ident = f"pid {process.pid}"
        self._started.set_result(process.pid)

    def ended(self, exit_: Exit) -> None:
        if not self._started.done():
            self._started.set_result(None)
        if not self._ended.done():
            self._ended.set_result(exit_)

    async def running(self) -> int | None:
        return await asyncio.shield(self._started)

    async def wait(self) -> Exit:
        return await asyncio.shield(self._ended)

    async def stop(self, grace_s: float) -> None:
        if self._process is None:
            if self.task is not None:
                self.task.cancel()  # still waiting for room: it never starts
            await self.wait()
            return
        _signal(self._process, signal.SIGTERM)
        if await finished_within(self.wait(), grace_s):
            return
        self.kill()
        await self.wait()

    def kill(self) -> None:
        if self._process is None:
            if self.task is not None:
                self.task.cancel()
            return
        _signal(self._process, signal.SIGKILL)


async def finished_within(awaitable: Awaitable[object], timeout_s: float) -> bool:
    """Await ``awaitable`` for at most ``timeout_s``: whether it finished (a process exited)."""
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except TimeoutError:
        return False
    return True


def _signal(process: asyncio.subprocess.Process, signum: int) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)


class PidReplica:
    """A process of a previous controller on this host (a replica, or the proxy), known only by
    its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ident = f"pid {pid}"

    async def running(self) -> int | None:
        return self.pid

    async def wait(self) -> Exit:
        while True:  # not our child: nothing to wait on but the pid itself
            if not pid_alive(self.pid):
                return Exit(None, "exited (not a child of this controller)")
            await asyncio.sleep(PID_POLL_S)

    async def stop(self, grace_s: float) -> None:
        kill_pid(self.pid, signal.SIGTERM)
        if await finished_within(self.wait(), grace_s):
            return
        self.kill()
        async with asyncio.timeout(5.0):
            await self.wait()

    def kill(self) -> None:
        kill_pid(self.pid)


class LocalProcessLauncher:
    """Runs each replica as a child ``python -m replica`` process on this host.

    With a CPU capacity, replicas that do not fit wait (pending) until others exit; with a GPU
    count, each replica gets its GPUs as ``CUDA_VISIBLE_DEVICES``. This host is one node, so
    ``max_replicas_per_node`` caps a deployment's replicas here.
    """

    def __init__(
        self,
        controller_address: str,
        token: str,
        log_dir: Path | None,
        *,
        capacity: NodeCapacity | None = None,
        replica_host: str = "127.0.0.1",
    ) -> None:
        self._controller_address = controller_address
        self._token = token
        self._log_dir = log_dir
        self._capacity = capacity if capacity is not None else NodeCapacity()
        self._replica_host = replica_host
        self._changed: asyncio.Event | None = None
        self._replicas: dict[str, LocalReplica] = {}
        self._adopted: dict[str, asyncio.Task[None]] = {}  # replicas of the last controller

    async def launch(
        self, replica_id: str, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> LocalReplica:
        replica = LocalReplica(replica_id)
        self._replicas[replica_id] = replica
        why_not = self._capacity.never_fits(request) or self._capacity.why_not(request)
        if why_not is None:  # the common case: started before launch() returns
            grant = self._capacity.take(replica_id, request)
            try:
                replica.started(await self._spawn(replica_id, grant))
            except BaseException:
                self._free(replica_id)
                raise
            replica.task = asyncio.create_task(
                self._supervise(replica_id, replica), name=f"launcher:local:{replica_id}"
            )
        else:
            replica.task = asyncio.create_task(
                self._place_then_supervise(replica_id, replica, request, on_pending),
                name=f"launcher:local:{replica_id}",
            )
        return replica

    async def launch_gang(
        self, gang: GangSpec, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> list[LocalReplica]:
        """The members start together once the node has room for all of them (this host is
        one node: placement strategies make no difference here)."""
        members = [LocalReplica(replica_id) for replica_id in gang.members]
        for replica_id, member in zip(gang.members, members, strict=True):
            self._replicas[replica_id] = member
        task = asyncio.create_task(
            self._place_gang(gang, members, request, on_pending),
            name=f"launcher:local:gang:{gang.gang_id}",
        )
        for member in members:
            member.task = task  # stopping one before they start stops the gang's placement
        return members

    async def _place_gang(
        self,
        gang: GangSpec,
        members: list[LocalReplica],
        request: ResourceRequest,
        on_pending: Callable[[str], None],
    ) -> None:
        reported = ""
        try:
            while (why_not := self._why_not_all(gang.members, request)) is not None:
                reason = f"gang of {len(members)} x {request.describe()} does not fit: {why_not}"
                if reason != reported:
                    reported = reason
                    on_pending(reason)
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
            for rank, (replica_id, member) in enumerate(zip(gang.members, members, strict=True)):
                grant = self._capacity.take(replica_id, request)
                member.started(await self._spawn(replica_id, grant, gang.context(rank)))
                member.task = asyncio.create_task(
                    self._supervise(replica_id, member), name=f"launcher:local:{replica_id}"
                )
        except asyncio.CancelledError:
            for replica_id, member in zip(gang.members, members, strict=True):
                if member._process is None:
                    member.ended(Exit(None, "stopped before it started"))
                    self._free(replica_id)
            raise
        except Exception as exc:
            logger.exception("Could not start gang %s", gang.gang_id)
            for replica_id, member in zip(gang.members, members, strict=True):
                if member._process is None:
                    member.ended(Exit(None, f"could not start: {exc}"))
                    self._free(replica_id)
                else:
                    member.kill()  # a gang starts whole or not at all

    def _why_not_all(self, holders: Sequence[str], request: ResourceRequest) -> str | None:
        """Why the node cannot hold one ``request`` per holder at once (None: it can)."""
        taken = []
        try:
            for holder in holders:
                why_not = self._capacity.never_fits(request) or self._capacity.why_not(request)
                if why_not is not None:
                    return why_not
                self._capacity.take(holder, request)
                taken.append(holder)
            return None
        finally:
            for holder in taken:
                self._capacity.release(holder)

    async def _place_then_supervise(
        self,
        replica_id: str,
        replica: LocalReplica,
        request: ResourceRequest,
        on_pending: Callable[[str], None],
    ) -> None:
        reported = ""
        try:
            while True:
                why_not = self._capacity.never_fits(request) or self._capacity.why_not(request)
                if why_not is None:
                    break
                if why_not != reported:
                    reported = why_not
                    on_pending(f"{request.describe()} does not fit: {why_not}")
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
            replica.started(await self._spawn(replica_id, self._capacity.take(replica_id, request)))
        except asyncio.CancelledError:
            replica.ended(Exit(None, "stopped before it started"))
            self._replicas.pop(replica_id, None)
            raise
        except Exception as exc:
            logger.exception("Could not start replica %s", replica_id)
            replica.ended(Exit(None, f"could not start: {exc}"))
            self._free(replica_id)
            return
        await self._supervise(replica_id, replica)

    async def _supervise(self, replica_id: str, replica: LocalReplica) -> None:
        process = replica._process
        assert process is not None
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            replica.ended(Exit(None, "the launcher closed"))
            raise
        finally:
            self._free(replica_id)
        replica.ended(Exit(code, f"exited with code {code}"))

    def _free(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self._capacity.release(replica_id)
        if self._changed is not None:  # wake every pending launch to check again
            self._changed.set()
            self._changed = None

    async def _spawn(
        self, replica_id: str, grant: Grant, gang: Mapping[str, object] | None = None
    ) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env[TOKEN_ENV] = self._token
        env.pop(ADDRESS_ENV, None)
        if self._capacity.num_gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in grant.gpu_ids)
        command = replica_command(
            self._controller_address, replica_id, self._replica_host, self._log_dir, gang
        )
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # terminal signals go to the driver, not to replicas
        )

    async def adopt(self, replica_id: str, pid: int, request: ResourceRequest) -> PidReplica | None:
        """A replica of the previous controller: it holds its CPUs (and the GPUs it was given,
        read from its environment) again until it exits."""
        if not pid or not pid_alive(pid):
            return None
        if replica_id not in self._replicas and replica_id not in self._adopted:
            self._capacity.hold(replica_id, request, _visible_gpus(pid))
            self._adopted[replica_id] = asyncio.create_task(
                self._release_when_gone(replica_id, PidReplica(pid)),
                name=f"launcher:local:adopted:{replica_id}",
            )
        return PidReplica(pid)

    async def _release_when_gone(self, replica_id: str, replica: PidReplica) -> None:
        try:
            await replica.wait()
        finally:
            self._adopted.pop(replica_id, None)
            self._free(replica_id)

    async def aclose(self) -> None:
        """Stop waiting for room; replicas already running are the supervisor's to stop."""
        tasks = [r.task for r in self._replicas.values() if r.task is not None]
        tasks += self._adopted.values()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _visible_gpus(pid: int) -> tuple[int, ...]:
    """The GPU indices a running process was handed (its CUDA_VISIBLE_DEVICES), if readable."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ()
    for item in environ:
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            value = item.split(b"=", 1)[1].decode(errors="replace")
            return tuple(int(i) for i in value.split(",") if i.strip().isdigit())
    return ()


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a replica this controller did not start (one it re-adopted after a restart)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
