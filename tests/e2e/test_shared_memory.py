"""Big payloads between processes on one host go through /dev/shm, and never leak there.

A 100 MB argument and a 100 MB result travel through shared-memory segments between the
driver and a real replica; a replica SIGKILLed while a segment for it waits, and a driver
SIGKILLed while a segment for it waits, leave nothing in /dev/shm: the end that outlives the
stream removes its segments. (Between hosts the handshake fails and gRPC carries them: see
tests/component/test_shared_memory_stream.py.)
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import serve
from serve._rpc import shm
from serve.exceptions import ReplicaDiedError
from tests.support.procs import ROOT, StandaloneController, python_env, wait_for

pytestmark = pytest.mark.e2e

MB = 1000 * 1000


def _segments(kind: str = "") -> set[str]:
    """Serve's segments in /dev/shm (``kind``: ``d`` sent by routers, ``r`` by replicas)."""
    return set(glob.glob(f"{shm.SHM_DIR}/serve-*-{kind}*"))


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    before = _segments()
    yield
    wait_for(lambda: not (_segments() - before), timeout_s=10)


@serve.deployment
class Blobs:
    def rotate(self, data: bytes) -> bytes:
        return data[1:] + data[:1]

    def make(self, size: int, started: str = "", go: str = "") -> bytes:
        """``size`` bytes; with marker paths, says it started and waits (bounded) for ``go``."""
        if started:
            Path(started).touch()
            deadline = time.monotonic() + 30
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return b"r" * size

    def pid(self) -> int:
        return os.getpid()

    def counts(self) -> dict[str, int]:
        return dict(shm.counts)


def test_a_100_mb_argument_and_result_go_through_shared_memory(serve_instance: None) -> None:
    handle = serve.run(Blobs.bind(), name="shm-blobs", route_prefix=None)
    handle.pid.remote().result()  # the stream is open and its handshake answered
    mine, theirs = dict(shm.counts), handle.counts.remote().result()
    data = os.urandom(16) * (100 * MB // 16)
    result = handle.rotate.remote(data).result(timeout_s=60)
    assert result == data[1:] + data[:1]
    after = handle.counts.remote().result()
    # One segment each way: the argument (written here, read there), the result (back).
    assert (shm.counts["written"] - mine["written"], after["read"] - theirs["read"]) == (1, 1)
    assert (after["written"] - theirs["written"], shm.counts["read"] - mine["read"]) == (1, 1)
    serve.delete("shm-blobs")


def test_a_replica_killed_before_it_read_a_segment_leaves_none(serve_instance: None) -> None:
    handle = serve.run(Blobs.bind(), name="shm-victim", route_prefix=None)
    replica = psutil.Process(handle.pid.remote().result())
    before = _segments("d")
    replica.suspend()  # it can read nothing now: the argument's segment waits for it
    try:
        response = handle.rotate.remote(b"a" * (100 * MB))
        wait_for(lambda: _segments("d") - before, timeout_s=30)
    finally:
        replica.kill()
    try:  # retried on the replacement if gRPC had not taken its frame yet; else lost
        assert response.result(timeout_s=60) == b"a" * (100 * MB - 1) + b"a"
    except ReplicaDiedError:
        pass
    # The driver saw the stream end and removed what it had written (asserted on teardown).
    serve.delete("shm-victim")


DRIVER = """
import sys
import serve

handle = serve.get_deployment_handle("Blobs", "shm-driver")
handle.pid.remote().result()
response = handle.make.remote(100 * 1000 * 1000, sys.argv[1], sys.argv[2])
response.result()
"""


def test_a_driver_killed_before_it_read_a_segment_leaves_none(
    standalone_controller: StandaloneController, tmp_path: Path
) -> None:
    """The replica outlives its driver (a standalone controller keeps it) and removes the
    result it wrote that the driver never took."""
    env = python_env(**standalone_controller.driver_env())
    deploy = subprocess.run(
        [sys.executable, "-c", _DEPLOY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert deploy.returncode == 0, deploy.stderr
    replica_pid = int(deploy.stdout.split()[-1])
    before = _segments("r")
    started, go = tmp_path / "started", tmp_path / "go"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(started), str(go)], cwd=ROOT, env=env
    )
    try:
        wait_for(started.exists, timeout_s=30)  # the call reached the replica
        driver.send_signal(signal.SIGSTOP)  # it takes nothing now: the result's segment waits
        go.touch()  # only now does the replica answer
        wait_for(lambda: _segments("r") - before, timeout_s=30)
        driver.kill()
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
    # The replica saw the stream end and removed its result (asserted on teardown too).
    wait_for(lambda: not (_segments("r") - before), timeout_s=10)
    assert psutil.pid_exists(replica_pid)  # and it serves on


_DEPLOY = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import serve
from tests.e2e.test_shared_memory import Blobs

handle = serve.run(Blobs.bind(), name="shm-driver", route_prefix=None)
print(handle.pid.remote().result())
"""
