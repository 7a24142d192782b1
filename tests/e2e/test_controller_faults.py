"""Controller faults through real daemons: restarts mid-rollout, hung replicas, private state."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import serve
from serve.exceptions import ReplicaDiedError
from tests.support.procs import ROOT, StandaloneController, pids_alive, python_env, wait_for

pytestmark = pytest.mark.e2e

CONSTRUCTOR_S = 4.0

ROLLOUT_DRIVER = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading, time
    import serve

    @serve.deployment(num_replicas=2, max_ongoing_requests=8)
    class Versioned:
        def __init__(self, version, constructor_s):
            time.sleep(constructor_s)
            self._version = version

        async def __call__(self):
            await asyncio.sleep(0.01)
            return self._version, os.getpid()

    h = serve.run(Versioned.bind("v1", 0.0), name="rollout")
    outcomes = {"ok": [], "failed": []}  # (monotonic time, version, pid) / repr
    stop = threading.Event()

    async def caller():
        while not stop.is_set():
            try:
                version, pid = await h.remote()
                outcomes["ok"].append((time.monotonic(), version, pid))
            except Exception as exc:
                outcomes["failed"].append(repr(exc))

    async def load():
        await asyncio.gather(*(caller() for _ in range(6)))

    loader = threading.Thread(target=lambda: asyncio.run(load()))
    loader.start()
    while not outcomes["ok"]:
        time.sleep(0.01)

    def redeploy():
        try:  # the controller is killed while this waits; the rollout must go on anyway
            serve.run(  # replacements start before old replicas stop (a 100% surge)
                Versioned.options(version="v2", max_surge_percent=100).bind(
                    "v2", float(sys.argv[1])
                ),
                name="rollout",
            )
        except Exception:
            pass

    threading.Thread(target=redeploy, daemon=True).start()
    print(json.dumps({"redeploying": True}), flush=True)
    sys.stdin.readline()  # the controller was killed and restarted
    restarted_at = time.monotonic()
    deadline = restarted_at + 90.0
    while time.monotonic() < deadline:  # until only v2 answers, for a while
        recent = [o for o in outcomes["ok"][-50:] if o[0] > restarted_at]
        if len(recent) == 50 and all(v == "v2" for _, v, _ in recent):
            break
        time.sleep(0.05)
    stop.set()
    loader.join(30)
    times = [t for t, _, _ in outcomes["ok"]]
    print(json.dumps({
        "ok": len(outcomes["ok"]),
        "failures": len(outcomes["failed"]),
        "failed": outcomes["failed"][:5],
        "max_gap_s": max(b - a for a, b in zip(times, times[1:])),
        "v1_after_restart": sorted(
            {p for t, v, p in outcomes["ok"] if v == "v1" and t > restarted_at}
        ),
        "v2": sorted({p for t, v, p in outcomes["ok"] if v == "v2"}),
        "last": [v for _, v, _ in outcomes["ok"][-50:]],
    }), flush=True)
    """
)


def test_controller_sigkill_mid_rollout_readopts_both_versions_and_keeps_serving(
    standalone_controller: StandaloneController,
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", ROLLOUT_DRIVER, str(CONSTRUCTOR_S)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(**standalone_controller.driver_env()),
        cwd=ROOT,
    ) as driver:
        assert driver.stdin is not None
        assert driver.stdout is not None
        try:
            assert json.loads(driver.stdout.readline())["redeploying"]
            v1 = standalone_controller.replica_pids()
            # v2 constructors running
            wait_for(lambda: len(standalone_controller.replica_pids()) == 4)
            standalone_controller.kill()
            standalone_controller.start()  # same port, same state directory
            driver.stdin.write("restarted\n")
            driver.stdin.flush()
            report = json.loads(driver.stdout.readline())
            assert driver.wait(60) == 0
        finally:
            if driver.poll() is None:
                driver.kill()
    assert report["failures"] == 0, report["failed"]
    assert set(report["last"]) == {"v2"}, report  # the rollout finished
    assert len(report["v2"]) == 2
    # The old replicas were re-adopted and kept serving until new ones ran (no stall while a
    # constructor ran again), then stopped.
    assert set(report["v1_after_restart"]) == set(v1)
    assert report["max_gap_s"] < CONSTRUCTOR_S / 2, report
    wait_for(lambda: not pids_alive(v1), timeout_s=30)
    assert sorted(standalone_controller.replica_pids()) == report["v2"]


HEALTH_CHECK_PERIOD_S = 1.0
HEALTH_CHECK_TIMEOUT_S = 1.0
UNHEALTHY_AFTER = 3


@serve.deployment(
    health_check_period_s=HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
    max_ongoing_requests=10,
)
class Sleeper:
    def __init__(self) -> None:
        self._ongoing = 0

    async def __call__(self, sleep_s: float) -> int:
        self._ongoing += 1
        try:
            await asyncio.sleep(sleep_s)
        finally:
            self._ongoing -= 1
        return os.getpid()

    def ongoing(self) -> int:
        return self._ongoing


@pytest.mark.usefixtures("serve_instance")
def test_a_hung_replica_is_killed_and_its_admitted_requests_fail_promptly() -> None:
    h = serve.run(Sleeper.bind(), name="hung")
    pid = h.remote(0.0).result(timeout_s=30)
    admitted = [h.remote(120.0) for _ in range(3)]
    wait_for(lambda: h.ongoing.remote().result(timeout_s=10) == 3, timeout_s=30)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Declared unhealthy after 3 missed checks: each is due a period after the last one
        # started, and fails after its timeout.
        unhealthy_after_s = UNHEALTHY_AFTER * max(HEALTH_CHECK_PERIOD_S, HEALTH_CHECK_TIMEOUT_S)
        bound_s = unhealthy_after_s + HEALTH_CHECK_PERIOD_S + 2.0
        for response in admitted:
            with pytest.raises(ReplicaDiedError):
                response.result(timeout_s=60)
        elapsed_s = time.monotonic() - stopped_at
        assert elapsed_s < bound_s, f"callers answered after {elapsed_s:.1f}s"
        wait_for(lambda: not pids_alive([pid]), timeout_s=10)
        assert h.remote(0.0).result(timeout_s=30) != pid  # replaced
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_state_directory_and_database_are_private(tmp_path: Path) -> None:
    import stat

    from serve._state_dir import STATE_DB_FILE
    from tests.support.procs import run_script

    state_dir = tmp_path / "state"
    controller = StandaloneController(state_dir)
    controller.start()
    try:
        result = run_script(
            "import serve\n"
            "@serve.deployment\n"
            "def f(secret): return 1\n"
            "serve.run(f.bind('sk-live-not-for-others'), name='private')\n",
            env=controller.driver_env(),
        )
        assert result.returncode == 0, result.stderr

        def mode(path: Path) -> int:
            return stat.S_IMODE(path.stat().st_mode)

        assert mode(state_dir) == 0o700
        assert mode(state_dir / "logs") == 0o700
        database = state_dir / STATE_DB_FILE
        files = [database, database.with_name(database.name + "-wal")]
        assert all(f.exists() for f in files)  # WAL mode: both while the controller runs
        # Exclusive locking keeps the WAL index in memory: there is no -shm file to protect.
        assert not database.with_name(database.name + "-shm").exists()
        assert {f.name: oct(mode(f)) for f in files} == {f.name: oct(0o600) for f in files}
    finally:
        controller.cleanup()
