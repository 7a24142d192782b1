"""Slurm's command line, as the launcher speaks it: the ``sbatch`` arguments and batch script
of a replica, a gang or a node's proxy; the text ``squeue`` and ``scontrol`` print, read back;
and which failures of a command are a verdict about the job and which only say that Slurm
could not be asked (``SlurmError.transient``). Pure functions, bar ``run_command``.

A replica's resources map to the job: ``num_cpus`` -> ``--cpus-per-task`` (rounded up, at
least 1), ``num_gpus`` -> ``--gres=gpu:N`` (a gang's members: ``--gpus-per-task``), ``memory``
-> ``--mem`` (a gang's: ``--mem-per-cpu``), custom ``resources`` -> GRES of the same name
(per node). The text formats used (``--parsable``, ``squeue -h -o``, ``scontrol -o``) are stable
across Slurm versions; ``--json`` and slurmrestd are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import math
import shlex
from collections.abc import Sequence
from pathlib import Path

from controller.resources import ResourceRequest
from serve._settings import NODE_ID_ENV

_MIB = 2**20
UNPLACEABLE = (  # sbatch refusals that mean "no node can ever run this", not "bad request"
    "Requested node configuration is not available",
    "More processors requested than permitted",
    "Memory required by task is not available",
    "Invalid generic resource",
    "Requested partition configuration not available",
)
# What Slurm's commands print when slurmctld is down, restarting or overloaded: no verdict about
# the job, so it is tried again (with backoff) and never counted as a replica failure.
_TRANSIENT = (
    "Unable to contact slurm controller",
    "Socket timed out",
    "Slurm temporarily unable",
    "Zero Bytes were transmitted",
    "Connection refused",
    "Communication connection failure",
    "Transport endpoint is not connected",
    "Resource temporarily unavailable",
    "backup controller in standby mode",
    "did not answer within",  # our own timeout of a command
)
RETRY_START_S = 0.5  # transient Slurm errors: the first wait before trying again
RETRY_MAX_S = 8.0  # ... doubling up to this


class SlurmError(Exception):
    """A Slurm command failed; the message has the command and what it printed."""

    @property
    def transient(self) -> bool:
        """Slurm could not be asked (slurmctld down, restarting, overloaded): try again."""
        return any(marker in str(self) for marker in _TRANSIENT)


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """How this controller submits jobs (``serve-controller --launcher slurm ...``)."""

    partition: str | None = None
    sbatch_options: tuple[str, ...] = ()  # passed to sbatch as given, e.g. "--time=1-00:00:00"
    poll_s: float = 0.5
    command_timeout_s: float = 30.0
    retry_s: float = 5.0  # how often a job Slurm refused to place is submitted again


@dataclasses.dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    node: str
    reason: str
    name: str


def job_name(instance: str, replica_id: str) -> str:
    """The job's name: which controller (by its state directory) and which replica."""
    return f"serve-{instance}:{replica_id}"


def proxy_key(node: str) -> str:
    """How a node's proxy is known among the jobs (never a replica id: those have two '#')."""
    return f"proxy:{node}"


def instance_tag(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def sbatch_args(
    request: ResourceRequest,
    options: SlurmOptions,
    *,
    name: str,
    output: str,
    exclude: Sequence[str] = (),
    nodelist: str | None = None,
) -> list[str]:
    """The sbatch command for one replica (its batch script comes on stdin)."""
    cpus = max(1, math.ceil(request.num_cpus))
    args = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--output={output}",
        f"--ntasks={max(1, request.gang_size)}",  # a gang: one task per member
        f"--cpus-per-task={cpus}",
        "--no-requeue",  # a lost replica is replaced by the controller, not restarted by Slurm
        "--export=ALL",  # the token travels in the job's environment
    ]
    if options.partition:
        args.append(f"--partition={options.partition}")
    gang = request.gang_size > 0
    gres = []
    if request.num_gpus and gang:
        args.append(f"--gpus-per-task={math.ceil(request.num_gpus)}")
    elif request.num_gpus:
        gres.append(f"gpu:{math.ceil(request.num_gpus)}")
    gres += [f"{name_}:{math.ceil(amount)}" for name_, amount in request.custom]  # per node
    if gres:
        args.append(f"--gres={','.join(gres)}")
    if request.memory_bytes and gang:  # --mem is per node; a gang's members may share one
        args.append(f"--mem-per-cpu={math.ceil(request.memory_bytes / _MIB / cpus)}M")
    elif request.memory_bytes:
        args.append(f"--mem={math.ceil(request.memory_bytes / _MIB)}M")
    if gang:
        args += _GANG_FLAGS.get(request.gang_strategy, [])
    if exclude:
        args.append(f"--exclude={','.join(sorted(exclude))}")
    if nodelist:
        args.append(f"--nodelist={nodelist}")
    args += options.sbatch_options
    return args


def gang_key(gang_id: str) -> str:
    """How a gang's one job is known among the jobs."""
    return f"gang:{gang_id}"


_GANG_FLAGS = {  # serve.gang.GangPlacementStrategy -> sbatch
    "PACK": [],  # Slurm packs tasks onto as few nodes as fit, by default
    "SPREAD": ["--spread-job"],
    "STRICT_PACK": ["--nodes=1"],
    "STRICT_SPREAD": ["--ntasks-per-node=1"],
}


def gang_batch_script(commands: Sequence[Sequence[str]], cpus_per_task: int) -> str:
    """A gang's job: one ``srun`` task per member, each running its own command (by
    SLURM_PROCID) on the node Slurm gave it. A member that fails ends the step, and so the job
    and every member with it (--kill-on-bad-exit): the gang lives and dies as one."""
    cases = " ".join(f"{rank}) exec {shlex.join(cmd)};;" for rank, cmd in enumerate(commands))
    task = (
        f'export {NODE_ID_ENV}="${{SLURMD_NODENAME:-$(hostname)}}"; '
        f'case "$SLURM_PROCID" in {cases} esac; exit 1'
    )
    return (
        "#!/bin/sh\n"
        f"exec srun --kill-on-bad-exit=1 --cpus-per-task={cpus_per_task} "
        f"sh -c {shlex.quote(task)}\n"
    )


def batch_script(command: Sequence[str]) -> str:
    """The job: the replica process itself, knowing which node it is on."""
    return (
        "#!/bin/sh\n"
        f'export {NODE_ID_ENV}="${{SLURMD_NODENAME:-$(hostname)}}"\n'
        f"exec {shlex.join(command)}\n"
    )


def parse_squeue(text: str) -> dict[str, JobState]:
    """``squeue -h -o '%i|%T|%N|%r|%j'`` output, by job id."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 4)
        if len(parts) == 5:
            job_id, state, node, reason, name = parts
            jobs[job_id] = JobState(job_id, state, node, reason, name)
    return jobs


def parse_scontrol_job(text: str) -> tuple[str, int | None]:
    """``scontrol -o show job ID``: the job's state and exit code (or the signal, negated)."""
    fields = dict(
        item.split("=", 1) for item in text.split() if "=" in item and not item.startswith("=")
    )
    state = fields.get("JobState", "UNKNOWN")
    code: int | None = None
    raw = fields.get("ExitCode", "")
    if ":" in raw:
        status, sig = raw.split(":", 1)
        with contextlib.suppress(ValueError):
            code = -int(sig) if int(sig) else int(status)
    return state, code


async def run_command(
    args: Sequence[str], *, timeout_s: float, stdin: str | None = None, env: dict[str, str] | None
) -> str:
    """Run a Slurm command; its stdout, or SlurmError with what it printed."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await process.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise SlurmError(f"{args[0]} did not answer within {timeout_s:.0f}s") from None
    if process.returncode != 0:
        raise SlurmError(f"{args[0]} failed: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")
