"""Fault tolerance and graceful lifecycle through real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import serve
from serve.exceptions import DeploymentFailedError, ReplicaDiedError
from tests.support.apps import Signal
from tests.support.procs import StandaloneController, pids_alive, run_script, wait_for

pytestmark = pytest.mark.e2e


@serve.deployment(num_replicas=3, max_ongoing_requests=4)
class Busy:
    def __init__(self, gate: Any = None) -> None:
        self._gate = gate

    async def __call__(self) -> int:
        if self._gate is not None:
            await self._gate.wait.remote()  # held until the test opens the gate
        await asyncio.sleep(0.05)
        return os.getpid()


def _running_pids(handle: Any, replicas: int, calls: int = 60) -> set[int]:
    pids = {handle.remote().result(timeout_s=30) for _ in range(calls)}
    assert len(pids) == replicas
    return pids


class Load:
    """Closed-loop callers in a thread: every outcome is recorded."""

    def __init__(self, handle: Any, callers: int = 12) -> None:
        self.handle = handle
        self.callers = callers
        self.outcomes: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()))

    async def _main(self) -> None:
        async def caller() -> None:
            while not self._stop.is_set():
                try:
                    self.outcomes.append(await self.handle.remote())
                except Exception as exc:
                    self.outcomes.append(exc)

        await asyncio.gather(*(caller() for _ in range(self.callers)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    @property
    def failures(self) -> list[BaseException]:
        return [o for o in self.outcomes if isinstance(o, BaseException)]


@pytest.mark.usefixtures("serve_instance")
def test_sigkill_under_load_fails_only_admitted_requests_and_is_replaced_quickly() -> None:
    h = serve.run(Busy.bind(Signal.bind()), name="kill")
    gate = serve.get_deployment_handle("Signal", "kill")
    gate.send.remote().result()
    pids = _running_pids(h, 3)
    victim = min(pids)
    gate.send.remote(clear=True).result()  # closed again
    with Load(h) as load:
        # Twelve callers fill the replicas' max_ongoing_requests: the victim holds four.
        wait_for(lambda: gate.num_waiters.remote().result() == 12, timeout_s=20)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(0.3)
        gate.send.remote().result()
        wait_for(
            lambda: (
                serve.status().applications["kill"].deployments["Busy"].replica_states
                == {"RUNNING": 3}
            ),
            timeout_s=10,
        )
        replaced_in_s = time.monotonic() - killed_at
        time.sleep(0.5)
    assert replaced_in_s < 5.0
    failures = load.failures
    assert len(failures) == 4, failures  # what the victim had admitted, no more
    assert all(isinstance(f, ReplicaDiedError) for f in failures)
    successes = len(load.outcomes) - len(failures)
    assert successes > 50
    new_pids = _running_pids(h, 3)
    assert victim not in new_pids


@serve.deployment(health_check_period_s=0.2, health_check_timeout_s=2)
class Sickly:
    def __init__(self) -> None:
        self._sick = False

    def make_sick(self) -> int:
        self._sick = True
        return os.getpid()

    def check_health(self) -> None:
        if self._sick:
            raise RuntimeError("I feel sick")

    def __call__(self) -> int:
        return os.getpid()


@pytest.mark.usefixtures("serve_instance")
def test_a_failing_check_health_gets_the_replica_replaced() -> None:
    h = serve.run(Sickly.bind(), name="sick")
    sick_pid = h.make_sick.remote().result()

    def reason() -> str:
        deployment = serve.status().applications["sick"].deployments["Sickly"]
        return deployment.message if deployment.status == "UNHEALTHY" else ""

    assert "I feel sick" in wait_for(reason, timeout_s=10)
    wait_for(lambda: not pids_alive([sick_pid]), timeout_s=10)
    assert h.remote().result(timeout_s=30) != sick_pid
    wait_for(lambda: serve.status().applications["sick"].status == "RUNNING", timeout_s=10)


@serve.deployment(health_check_period_s=0.2)
class AlwaysSick:
    def check_health(self) -> None:
        raise RuntimeError("never healthy")


@pytest.mark.usefixtures("serve_instance")
def test_a_replica_that_is_never_healthy_fails_the_deploy() -> None:
    with pytest.raises(DeploymentFailedError, match="never healthy"):
        serve.run(AlwaysSick.bind(), name="never")


@pytest.mark.usefixtures("serve_instance")
def test_rolling_update_under_load_fails_nothing() -> None:
    h = serve.run(Busy.bind(), name="rolling")
    old = _running_pids(h, 3)
    with Load(h) as load:
        time.sleep(0.3)
        serve.run(Busy.options(user_config=None, version="v2").bind(), name="rolling")
        time.sleep(0.5)
    assert load.failures == []
    assert len(load.outcomes) > 50
    assert _running_pids(h, 3).isdisjoint(old)


@serve.deployment(max_ongoing_requests=20)
class Blocked:
    def __init__(self, signal: Any) -> None:
        self._signal = signal

    async def __call__(self, i: int) -> int:
        await self._signal.wait.remote()
        return i


@pytest.mark.usefixtures("serve_instance")
def test_graceful_delete_finishes_ten_in_flight_requests() -> None:
    serve.run(Signal.bind(), name="gate", route_prefix=None)
    signal_handle = serve.get_app_handle("gate")
    h = serve.run(Blocked.bind(signal_handle), name="graceful")
    responses = [h.remote(i) for i in range(10)]
    wait_for(lambda: signal_handle.num_waiters.remote().result() == 10)
    deleter = threading.Thread(target=serve.delete, args=("graceful",))
    deleter.start()
    wait_for(lambda: serve.status().applications["graceful"].status == "DELETING")
    time.sleep(0.3)  # the replica is draining: requests keep running
    signal_handle.send.remote().result()
    assert [r.result(timeout_s=30) for r in responses] == list(range(10))
    deleter.join(30)
    assert not deleter.is_alive()
    assert "graceful" not in serve.status().applications


@pytest.mark.usefixtures("serve_instance")
def test_a_stuck_request_is_cut_off_after_the_graceful_timeout() -> None:
    serve.run(Signal.bind(), name="gate2", route_prefix=None)
    signal_handle = serve.get_app_handle("gate2")
    h = serve.run(
        Blocked.options(graceful_shutdown_timeout_s=0.5).bind(signal_handle), name="forceful"
    )
    stuck = h.remote(1)
    wait_for(lambda: signal_handle.num_waiters.remote().result() == 1)
    started = time.monotonic()
    serve.delete("forceful")
    assert time.monotonic() - started < 10
    with pytest.raises(ReplicaDiedError):
        stuck.result(timeout_s=10)


DRIVER = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    import serve

    @serve.deployment(num_replicas=2, max_ongoing_requests=8)
    class Pid:
        async def __call__(self):
            await asyncio.sleep(0.01)
            return os.getpid()

    h = serve.run(Pid.bind(), name="survivor")
    print(json.dumps({"ready": True}), flush=True)
    outcomes = {"ok": 0, "failed": [], "pids_before": set(), "pids_after": set()}
    phase = "pids_before"

    async def caller(stop_at):
        while time.monotonic() < stop_at:
            try:
                outcomes[phase].add(await h.remote())
                outcomes["ok"] += 1
            except Exception as exc:
                outcomes["failed"].append(repr(exc))

    async def main():
        global phase
        seconds = float(sys.argv[1])
        await asyncio.gather(*(caller(time.monotonic() + seconds) for _ in range(8)))
        phase = "pids_after"
        await asyncio.gather(*(caller(time.monotonic() + 1.0) for _ in range(8)))

    asyncio.run(main())
    print(json.dumps({
        "ok": outcomes["ok"],
        "failed": outcomes["failed"][:5],
        "failures": len(outcomes["failed"]),
        "pids_before": sorted(outcomes["pids_before"]),
        "pids_after": sorted(outcomes["pids_after"]),
    }), flush=True)
    """
)


def test_controller_sigkill_under_load_fails_nothing_and_replicas_are_readopted(
    standalone_controller: StandaloneController,
) -> None:
    import subprocess
    import sys

    from tests.support.procs import ROOT, python_env

    with subprocess.Popen(
        [sys.executable, "-c", DRIVER, "13"],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(**standalone_controller.driver_env()),
        cwd=ROOT,
    ) as driver:
        assert driver.stdout is not None
        assert json.loads(driver.stdout.readline())["ready"]
        replicas = standalone_controller.replica_pids()
        assert len(replicas) == 2
        time.sleep(1.0)
        standalone_controller.kill()
        down_at = time.monotonic()
        # While the controller is down, deploys fail fast with a clear error.
        refused = run_script(
            "import serve\n@serve.deployment\ndef f(): return 1\nserve.run(f.bind(), name='new')\n",
            timeout_s=30,
            env=standalone_controller.driver_env(),
        )
        assert refused.returncode != 0
        assert "ControllerUnavailableError" in refused.stderr
        time.sleep(max(0.0, 10.0 - (time.monotonic() - down_at)))
        standalone_controller.start()  # same port, same state directory
        report = json.loads(driver.stdout.readline())
        driver.wait(60)
    assert report["failures"] == 0, report["failed"]
    assert report["ok"] > 200
    assert report["pids_before"] == replicas
    assert report["pids_after"] == replicas  # re-adopted: no restarts
    assert standalone_controller.replica_pids() == replicas


def test_replicas_without_a_controller_exit_after_the_orphan_timeout(tmp_path: Path) -> None:
    controller = StandaloneController(tmp_path / "state", SERVE_ORPHAN_TIMEOUT_S="1.5")
    controller.start()
    try:
        result = run_script(
            "import serve\n"
            "@serve.deployment(num_replicas=2)\n"
            "def f(): return 1\n"
            "serve.run(f.bind(), name='orphans')\n",
            env=controller.driver_env(),
        )
        assert result.returncode == 0, result.stderr
        replicas = controller.replica_pids()
        assert len(replicas) == 2
        controller.kill()
        wait_for(lambda: not pids_alive(replicas), timeout_s=15)
    finally:
        controller.cleanup()
