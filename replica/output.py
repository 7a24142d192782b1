"""What user code prints: shown where the replica's stderr goes, prefixed as Ray prefixes it,
and kept in the replica's log file.

A replica's stdout is not a terminal (the launcher reads only its READY line), so ``print()``
used to vanish. After start-up, ``sys.stdout`` and ``sys.stderr`` become line-buffered streams
that write each line as ``(ServeReplica:app:deployment pid=N) line`` to the replica's stderr
(the driver's terminal for an embedded controller, the controller's log otherwise) and the bare
line to the replica's log file.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path
from typing import IO

from serve._models import ReplicaID


class PrefixedOutput(io.TextIOBase):
    """A text stream that writes whole lines, prefixed, to ``target`` and bare to ``copy``."""

    def __init__(self, target: IO[str], prefix: str, copy: IO[str] | None) -> None:
        self._target = target
        self._prefix = prefix
        self._copy = copy
        self._pending = ""
        self._lock = threading.Lock()  # sync user code prints from worker threads

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            if "\n" in self._pending:
                *lines, self._pending = self._pending.split("\n")
                self._emit(lines)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._emit([self._pending])
                self._pending = ""
            self._target.flush()
            if self._copy is not None:
                self._copy.flush()

    def _emit(self, lines: list[str]) -> None:
        self._target.write("".join(f"{self._prefix}{line}\n" for line in lines))
        self._target.flush()
        if self._copy is not None:
            self._copy.write("".join(f"{line}\n" for line in lines))


def capture_user_output(replica_id: ReplicaID, log_file: Path | None) -> None:
    """Route this process's ``print()`` and ``sys.stderr`` writes as the module docstring says."""
    deployment = replica_id.deployment_id
    prefix = f"(ServeReplica:{deployment.app_name}:{deployment.name} pid={os.getpid()}) "
    copy: IO[str] | None = None
    if log_file is not None:
        copy = open(log_file, "a", buffering=1)  # noqa: SIM115 - kept for the process's life
    target = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
    stream = PrefixedOutput(target, prefix, copy)
    sys.stdout = stream
    sys.stderr = stream
