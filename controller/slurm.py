"""``SlurmLauncher``: each replica is one Slurm batch job (a gang, one job of a task per
member; a node's proxy, one job pinned to the node), placed and sized by Slurm.

Jobs are submitted and read through ``controller.slurm_cli``. ``max_replicas_per_node`` ->
``--exclude`` of the nodes that already hold that many replicas of the deployment (such
replicas are submitted one at a time, so each sees where the last one landed), and so are the
nodes a deployment's replicas kept failing to start on. A job Slurm cannot place stays pending,
with Slurm's reason shown by ``serve status``; one Slurm cannot be asked about (slurmctld down)
is submitted again with backoff, never counted as a failure.

The cluster token reaches the job through the environment ``sbatch`` exports (job
environments are readable only by their owner and Slurm's admins), never through a command
line or the batch script. One poller (``squeue`` every ``poll_s``) follows every job: RUNNING
means started, leaving the queue means ended (``scontrol`` says how: COMPLETED, FAILED,
CANCELLED, NODE_FAIL, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from controller.launcher import Exit, finished_within, replica_command
from controller.resources import GangSpec, ResourceRequest
from controller.slurm_cli import (
    RETRY_MAX_S,
    RETRY_START_S,
    UNPLACEABLE,
    JobState,
    SlurmError,
    SlurmOptions,
    batch_script,
    gang_batch_script,
    gang_key,
    job_name,
    parse_scontrol_job,
    parse_squeue,
    proxy_key,
    run_command,
    sbatch_args,
)
from serve._settings import ADDRESS_ENV, NODE_ID_ENV, TOKEN_ENV
from serve._task_owner import TaskOwner

logger = logging.getLogger(__name__)


class SlurmJob:
    """One replica's job, as the poller sees it."""

    def __init__(self, replica_id: str, request: ResourceRequest, launcher: SlurmLauncher) -> None:
        self.replica_id = replica_id
        self.request = request
        self.job_id = ""
        self.ident = f"replica {replica_id} (not submitted)"
        self.node = ""
        self.reason = ""
        self.missing = 0  # polls in a row that did not list the job
        self._launcher = launcher
        loop = asyncio.get_running_loop()
        self._started: asyncio.Future[int | None] = loop.create_future()
        self._ended: asyncio.Future[Exit] = loop.create_future()

    def submitted(self, job_id: str) -> None:
        self.job_id = job_id
        self.ident = f"Slurm job {job_id}"

    def started(self, node: str) -> None:
        self.node = node
        if not self._started.done():
            self._started.set_result(0)  # the pid is on another host; the link reports it

    def ended(self, exit_: Exit) -> None:
        if not self._started.done():
            self._started.set_result(None)
        if not self._ended.done():
            self._ended.set_result(exit_)

    def done(self) -> bool:
        return self._ended.done()

    async def running(self) -> int | None:
        return await asyncio.shield(self._started)

    async def wait(self) -> Exit:
        return await asyncio.shield(self._ended)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to the replica (it drains), then cancel the job after ``grace_s``."""
        if not self.job_id:
            self.ended(Exit(None, "stopped before it was submitted"))
            return
        if self._started.done():
            with contextlib.suppress(SlurmError):
                await self._launcher.scancel(self.job_id, "--signal=TERM", "--full")
            if await finished_within(self.wait(), grace_s):
                return
        with contextlib.suppress(SlurmError):
            await self._launcher.scancel(self.job_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._launcher.options.command_timeout_s):
                await self.wait()

    def kill(self) -> None:
        if not self.job_id:
            self.ended(Exit(None, "stopped before it was submitted"))
            return
        self._launcher.spawn(self._launcher.scancel(self.job_id), f"scancel:{self.job_id}")


class GangMember:
    """One member of a gang: its gang's job (shared with the others). Stopping or killing one
    member ends the whole job: a gang is stopped whole (RESTART_GANG)."""

    def __init__(self, job: SlurmJob) -> None:
        self._job = job

    @property
    def ident(self) -> str:
        return f"{self._job.ident} (gang)"

    async def running(self) -> int | None:
        return await self._job.running()

    async def wait(self) -> Exit:
        ended = await self._job.wait()
        return dataclasses.replace(ended, node="")  # the job's nodes, not this member's

    async def stop(self, grace_s: float) -> None:
        await self._job.stop(grace_s)

    def kill(self) -> None:
        self._job.kill()


class SlurmLauncher:
    """Submits one batch job per replica and follows them all with one poller."""

    def __init__(
        self,
        controller_address: str,
        token: str,
        log_dir: Path,
        *,
        instance: str,
        options: SlurmOptions | None = None,
    ) -> None:
        self.options = options if options is not None else SlurmOptions()
        self._controller_address = controller_address
        self._token = token
        self._log_dir = log_dir
        self._instance = instance
        self._jobs: dict[str, SlurmJob] = {}  # by replica id
        # The poller, submissions and scancels: children of one TaskGroup, from the first job.
        self._tasks = TaskOwner("launcher:slurm", logger)
        self._poller: asyncio.Task[None] | None = None
        self._placing: dict[str, asyncio.Lock] = {}  # per group, for max_replicas_per_node
        self._on_pending: dict[str, Callable[[str], None]] = {}  # by job id
        self._closed = False

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[TOKEN_ENV] = self._token
        env.pop(ADDRESS_ENV, None)
        env.pop(NODE_ID_ENV, None)
        return env

    def spawn(self, coro: object, name: str) -> None:
        """Run ``coro`` as a child of the launcher's group (started by the first job: every
        caller comes after one)."""
        assert asyncio.iscoroutine(coro)
        self._tasks.spawn(coro, f"launcher:slurm:{name}")

    async def scancel(self, job_id: str, *flags: str) -> None:
        await run_command(
            ["scancel", *flags, job_id], timeout_s=self.options.command_timeout_s, env=None
        )

    async def launch(
        self, replica_id: str, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> SlurmJob:
        job = SlurmJob(replica_id, request, self)
        self._jobs[replica_id] = job
        await self._ensure_poller()
        if request.max_replicas_per_node is None:
            self.spawn(self._submit_one(job, on_pending), f"submit:{replica_id}")
        else:  # placed one at a time: the next job must know where this one landed
            self.spawn(self._submit_spread(job, on_pending), f"spread:{replica_id}")
        return job

    async def _submit_one(self, job: SlurmJob, on_pending: Callable[[str], None]) -> None:
        try:
            await self._submit(job, on_pending, exclude=await self._exclusions(job.request, set()))
        except SlurmError as exc:
            job.ended(Exit(None, str(exc)))

    async def _submit_spread(self, job: SlurmJob, on_pending: Callable[[str], None]) -> None:
        request = job.request
        assert request.max_replicas_per_node is not None
        lock = self._placing.setdefault(request.group, asyncio.Lock())
        async with lock:
            reported = ""
            while not job.done():
                nodes = await self._nodes()
                full = self._full_nodes(request.group, request.max_replicas_per_node)
                if nodes and set(nodes) <= full:
                    reason = (
                        f"{request.describe()}: every node ({len(nodes)}) already runs "
                        f"{request.max_replicas_per_node} replica(s) of this deployment"
                    )
                    if reason != reported:
                        on_pending(reason)
                        reported = reason
                    await asyncio.sleep(self.options.poll_s)
                    continue
                try:
                    exclude = await self._exclusions(request, full, nodes)
                    await self._submit(job, on_pending, exclude=exclude)
                except SlurmError as exc:
                    job.ended(Exit(None, str(exc)))
                    return
                await job.running()  # placed (or gone): the next one may go
                return

    async def launch_gang(
        self, gang: GangSpec, request: ResourceRequest, on_pending: Callable[[str], None]
    ) -> list[GangMember]:
        """One job of ``gang_size`` tasks, placed by the gang's strategy: Slurm allocates them
        all at once or keeps the job pending."""
        job = SlurmJob(gang_key(gang.gang_id), request, self)
        self._jobs[job.replica_id] = job
        await self._ensure_poller()
        pg_name = job_name(self._instance, job.replica_id)
        commands = [
            replica_command(
                self._controller_address, member, "auto", self._log_dir, gang.context(rank, pg_name)
            )
            for rank, member in enumerate(gang.members)
        ]
        script = gang_batch_script(commands, max(1, math.ceil(request.num_cpus)))
        self.spawn(self._submit_gang(job, script, on_pending), f"submit:{job.replica_id}")
        return [GangMember(job) for _ in gang.members]

    async def _submit_gang(
        self, job: SlurmJob, script: str, on_pending: Callable[[str], None]
    ) -> None:
        try:
            exclude = await self._exclusions(job.request, set())
            await self._submit(job, on_pending, exclude, script=script)
        except SlurmError as exc:
            job.ended(Exit(None, str(exc)))

    async def launch_proxy(
        self, node: str, command: Sequence[str], on_pending: Callable[[str], None]
    ) -> SlurmJob:
        """A serve-proxy on ``node``: a job like a replica's (1 CPU), pinned there."""
        job = SlurmJob(proxy_key(node), ResourceRequest(), self)
        self._jobs[job.replica_id] = job
        await self._ensure_poller()
        self.spawn(self._submit_proxy(job, command, node, on_pending), f"submit:{job.replica_id}")
        return job

    async def _submit_proxy(
        self, job: SlurmJob, command: Sequence[str], node: str, on_pending: Callable[[str], None]
    ) -> None:
        try:
            await self._submit(job, on_pending, (), command=command, nodelist=node)
        except SlurmError as exc:
            job.ended(Exit(None, str(exc)))

    async def adopt_proxies(self) -> dict[str, SlurmJob]:
        """The node proxies the previous controller launched that still run, by node."""
        prefix = job_name(self._instance, proxy_key(""))
        found = {}
        for state in (await self._squeue()).values():
            if state.name.startswith(prefix):
                node = state.name[len(prefix) :]
                job = SlurmJob(proxy_key(node), ResourceRequest(), self)
                job.submitted(state.job_id)
                if state.state == "RUNNING":
                    job.started(state.node)
                self._jobs[job.replica_id] = job
                found[node] = job
        if found:
            await self._ensure_poller()
        return found

    async def _exclusions(
        self, request: ResourceRequest, full: set[str], nodes: list[str] | None = None
    ) -> list[str]:
        """Nodes to --exclude: those full for max_replicas_per_node, and those where the
        deployment's replicas kept failing to start, unless that would leave no node at all."""
        if not request.avoid_nodes:
            return sorted(full)
        nodes = await self._nodes() if nodes is None else nodes
        avoid = (full | set(request.avoid_nodes)) & set(nodes)
        if not nodes or avoid >= set(nodes):
            return sorted(full)
        return sorted(avoid)

    def _full_nodes(self, group: str, limit: int) -> set[str]:
        counts: dict[str, int] = {}
        for other in self._jobs.values():
            if other.request.group == group and other.node and not other.done():
                counts[other.node] = counts.get(other.node, 0) + 1
        return {node for node, count in counts.items() if count >= limit}

    async def _nodes(self) -> list[str]:
        args = ["sinfo", "-h", "-N", "-o", "%N"]
        if self.options.partition:
            args.append(f"--partition={self.options.partition}")
        try:
            out = await run_command(args, timeout_s=self.options.command_timeout_s, env=None)
        except SlurmError as exc:
            logger.warning("%s", exc)
            return []
        return sorted({line.strip() for line in out.splitlines() if line.strip()})

    async def _submit(
        self,
        job: SlurmJob,
        on_pending: Callable[[str], None],
        exclude: Sequence[str],
        *,
        command: Sequence[str] | None = None,
        nodelist: str | None = None,
        script: str | None = None,
    ) -> None:
        """sbatch (the replica, or ``command``); a job no node can run is retried every
        retry_s, and one Slurm cannot be asked about with backoff, both reported pending."""
        safe = job.replica_id.replace("#", "_").replace("/", "_").replace(":", "_")
        args = sbatch_args(
            job.request,
            self.options,
            name=job_name(self._instance, job.replica_id),
            output=str(self._log_dir / f"slurm_{safe}_%j.out"),
            exclude=exclude,
            nodelist=nodelist,
        )
        if script is None:
            if command is None:
                command = replica_command(
                    self._controller_address, job.replica_id, "auto", self._log_dir
                )
            script = batch_script(command)
        reported = ""
        backoff_s = RETRY_START_S
        while not job.done():
            try:
                out = await run_command(
                    args, timeout_s=self.options.command_timeout_s, stdin=script, env=self._env()
                )
            except SlurmError as exc:
                if exc.transient:  # no verdict about the job: ask again, later
                    reason = f"Slurm is unreachable ({exc}); submitting again in {backoff_s:g}s"
                    delay_s, backoff_s = backoff_s, min(backoff_s * 2, RETRY_MAX_S)
                elif any(marker in str(exc) for marker in UNPLACEABLE):
                    reason = f"Slurm cannot place {job.request.describe()}: {exc}"
                    delay_s = self.options.retry_s
                else:
                    raise
                if reason != reported:
                    logger.warning("Replica %s: %s", job.replica_id, reason)
                    on_pending(reason)
                    reported = reason
                await asyncio.sleep(delay_s)
                continue
            job_id = out.strip().split(";", 1)[0]
            if job.done():  # stopped while sbatch ran: nobody wants this job
                await self.scancel(job_id)
                return
            job.submitted(job_id)
            job.reason = ""
            self._on_pending[job_id] = on_pending
            logger.info("Replica %s is Slurm job %s", job.replica_id, job_id)
            return

    async def _ensure_poller(self) -> None:
        """At the first job: start the owner of the launcher's tasks, and the poller."""
        if self._poller is None and not self._closed:
            await self._tasks.start()
            if self._poller is None:
                self._poller = self._tasks.spawn(self._poll_loop(), "launcher:slurm:poll")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_s)
            try:
                await self._poll()
            except SlurmError as exc:  # slurmctld down or restarting: jobs keep their state
                logger.warning("Could not poll Slurm: %s", exc)
            except Exception:
                logger.exception("Slurm poll failed")

    async def _poll(self) -> None:
        watched = [j for j in self._jobs.values() if j.job_id and not j.done()]
        if not watched:
            self._forget_done()
            return
        listed = await self._squeue()
        for job in watched:
            state = listed.get(job.job_id)
            if state is None:
                job.missing += 1
                if job.missing >= 2:  # not a listing taken just as it was submitted
                    await self._ended(job)
                continue
            job.missing = 0
            if state.state in ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED"):
                job.started(state.node)
            elif state.state in ("PENDING", "CONFIGURING") and state.reason not in (
                "",
                "None",
                job.reason,
            ):
                job.reason = state.reason
                listener = self._on_pending.get(job.job_id)
                if listener is not None:
                    listener(
                        f"Slurm job {job.job_id} for {job.request.describe()} is pending "
                        f"({state.reason})"
                    )
        self._forget_done()

    async def _ended(self, job: SlurmJob) -> None:
        state, code = "gone", None
        for attempt in range(3):  # how it ended; a slurmctld blip is not worth a wrong answer
            try:
                out = await run_command(
                    ["scontrol", "-o", "show", "job", job.job_id],
                    timeout_s=self.options.command_timeout_s,
                    env=None,
                )
            except SlurmError as exc:
                if not exc.transient:
                    break
                await asyncio.sleep(RETRY_START_S * 2**attempt)
                continue
            state, code = parse_scontrol_job(out)
            break
        where = f" on {job.node}" if job.node else ""
        job.ended(
            Exit(code, f"Slurm job {job.job_id}{where} ended: {state}, exit code {code}", job.node)
        )

    async def _squeue(self) -> dict[str, JobState]:
        """This user's jobs, as Slurm lists them now."""
        out = await run_command(
            ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%T|%N|%r|%j"],
            timeout_s=self.options.command_timeout_s,
            env=None,
        )
        return parse_squeue(out)

    def _forget_done(self) -> None:
        for replica_id in [r for r, j in self._jobs.items() if j.done()]:
            job = self._jobs.pop(replica_id)
            self._on_pending.pop(job.job_id, None)

    async def adopt(
        self, replica_id: str, pid: int, request: ResourceRequest
    ) -> SlurmJob | GangMember | None:
        """A replica the previous controller launched: its job (a gang member: its gang's
        job), if still queued or running, with the request it was submitted with (so spreading
        counts it where it runs)."""
        if request.gang_id:
            key = gang_key(request.gang_id)
            shared = self._jobs.get(key)
            if shared is None:
                found = await self.adopt(key, pid, dataclasses.replace(request, gang_id=""))
                shared = found if isinstance(found, SlurmJob) else None
            return GangMember(shared) if shared is not None else None
        for attempt in range(3):  # a restarted controller may meet a restarting slurmctld
            try:
                listed = await self._squeue()
                break
            except SlurmError as exc:
                if not exc.transient or attempt == 2:
                    raise
                await asyncio.sleep(RETRY_MAX_S)
        name = job_name(self._instance, replica_id)
        for state in listed.values():
            if state.name == name:
                job = SlurmJob(replica_id, request, self)
                job.submitted(state.job_id)
                if state.state == "RUNNING":
                    job.started(state.node)
                self._jobs[replica_id] = job
                await self._ensure_poller()
                return job
        return None

    async def aclose(self) -> None:
        """Stop following jobs; they keep running and re-link to the next controller."""
        self._closed = True
        await self._tasks.aclose()
        for job in self._jobs.values():
            job.ended(Exit(None, "the controller stopped following it"))
