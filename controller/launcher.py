"""Starting replica processes: the launcher contract, and ``LocalProcessLauncher``, which runs
``serve-replica`` subprocesses on this host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Protocol

from serve._settings import ADDRESS_ENV, TOKEN_ENV


class Process(Protocol):
    """A launched replica process, as the supervisor uses it."""

    pid: int

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts a replica process that links back to the controller by itself."""

    async def launch(self, replica_id: str) -> Process: ...


class ReplicaProcess:
    """A launched replica process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.pid = process.pid

    async def wait(self) -> int:
        return await self._process.wait()

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()


class LocalProcessLauncher:
    """Runs each replica as a child ``python -m replica`` process on this host."""

    def __init__(self, controller_address: str, token: str, log_dir: Path | None) -> None:
        self._controller_address = controller_address
        self._token = token
        self._log_dir = log_dir

    async def launch(self, replica_id: str) -> ReplicaProcess:
        env = dict(os.environ)
        env[TOKEN_ENV] = self._token
        env.pop(ADDRESS_ENV, None)
        command = [
            sys.executable,
            "-P",  # the daemon's own modules, never a `replica` package in the working dir
            "-m",
            "replica",
            "--controller",
            self._controller_address,
            "--replica-id",
            replica_id,
        ]
        if self._log_dir is not None:
            safe = replica_id.replace("#", "_").replace("/", "_")
            command += ["--log-file", str(self._log_dir / f"replica_{safe}.log")]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # terminal signals go to the driver, not to replicas
        )
        return ReplicaProcess(process)


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a replica this controller did not start (one it re-adopted after a restart)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
