"""Faults of the state database: each gets a clear error naming the file, never a crash or a
silent loss (issue 11, finding 6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import StandaloneController, pids_alive, python_env, run_script, wait_for

pytestmark = pytest.mark.e2e

DRIVER = """
import serve

@serve.deployment
class Kept:
    def __call__(self):
        return "kept"

assert serve.run(Kept.bind(), name="kept").remote().result() == "kept"
print("ok")
"""


def _start_failing(state_dir: Path) -> subprocess.CompletedProcess[str]:
    """Start a controller that should refuse to start; return how it ended (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "controller", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
    )


def test_a_corrupted_database_is_reported_by_name_without_a_traceback(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "state.db").write_bytes(b"this is not a database" * 200)
    result = _start_failing(state_dir)
    assert result.returncode != 0
    assert f"The state database {state_dir / 'state.db'} cannot be used" in result.stderr
    assert "Move it" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_damaged_write_ahead_log_is_refused_not_silently_dropped(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    controller = StandaloneController(state_dir).start()
    try:
        result = run_script(DRIVER, env=controller.driver_env())
        assert result.returncode == 0, result.stderr
        assert controller.process is not None
        os.kill(controller.process.pid, signal.SIGKILL)  # the deploy is only in the WAL now
        wait_for(lambda: not pids_alive([controller.process.pid]))  # type: ignore[union-attr]
    finally:
        controller.cleanup()
    wal = state_dir / "state.db-wal"
    data = bytearray(wal.read_bytes())
    assert len(data) > 32 + 24 + 512, "the deploy should still be in the write-ahead log"
    data[len(data) - 100] ^= 0xFF  # a flipped bit in the last frame's page
    wal.write_bytes(bytes(data))
    result = _start_failing(state_dir)
    assert result.returncode != 0
    assert f"write-ahead log {wal} is damaged" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unwritable_shared_memory_file_does_not_kill_the_controller(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    shm = state_dir / "state.db-shm"
    shm.write_bytes(b"")
    shm.chmod(0o400)
    controller = StandaloneController(state_dir).start()
    try:
        result = run_script(DRIVER, env=controller.driver_env())
        assert result.returncode == 0, result.stderr
        assert controller.process is not None
        assert controller.process.poll() is None  # still serving after a deploy
    finally:
        controller.cleanup()
