"""Process lifecycle through real daemons: drivers, embedded and standalone controllers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import (
    ROOT,
    kill_tree,
    pids_alive,
    python_env,
    run_script,
    serve_processes,
    wait_for,
)

pytestmark = pytest.mark.e2e

APP = textwrap.dedent(
    """
    import os, sys, json
    import serve

    @serve.deployment(num_replicas=2)
    class Pid:
        def __call__(self):
            return os.getpid()

    @serve.deployment
    class Ingress:
        def __init__(self, pid):
            self._pid = pid
        async def __call__(self):
            return await self._pid.remote()
    """
)


def _run_example(script: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run an example as a user would, from the project root."""
    result = subprocess.run(
        [sys.executable, f"examples/{script}"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env=python_env(),
    )
    assert result.returncode == 0, result.stderr
    return result


def test_seed_example_runs_as_a_plain_script() -> None:
    result = _run_example("hello.py", 120)
    assert "Hello world!" in result.stdout
    assert "RUNNING" in result.stdout


def test_a_ray_program_runs_with_only_the_import_changed() -> None:
    result = _run_example("ray_compat.py", 180)
    assert "ray-compatible program OK" in result.stdout


@pytest.mark.parametrize("name", ["multiplexing", "streaming"])
def test_the_multiplexing_and_streaming_examples_run(name: str) -> None:
    result = _run_example(f"{name}.py", 120)
    assert f"{name} example OK" in result.stdout


@contextlib.contextmanager
def _driver(body: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """A driver process that prints one JSON line, then does whatever ``body`` says."""
    with subprocess.Popen(
        [sys.executable, "-c", APP + textwrap.dedent(body)],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
        cwd=ROOT,
    ) as driver:
        try:
            assert driver.stdout is not None
            line = driver.stdout.readline()
            assert line, "the driver died before reporting"
            yield driver, json.loads(line)
        finally:
            kill_tree(driver.pid)


def test_killed_driver_leaves_no_process_behind() -> None:
    with _driver(
        """
        h = serve.run(Ingress.bind(Pid.bind()))
        h.remote().result()
        import psutil
        me = psutil.Process()
        print(json.dumps({"pids": [p.pid for p in me.children(recursive=True)]}), flush=True)
        import time
        time.sleep(600)
        """
    ) as (driver, info):
        pids = info["pids"]
        assert isinstance(pids, list)
        assert len(pids) == 4
        try:
            driver.send_signal(signal.SIGKILL)
            driver.wait(10)
            wait_for(lambda: not pids_alive(pids), timeout_s=30)
        finally:
            for pid in pids_alive(pids):
                kill_tree(pid)


def test_driver_exit_stops_the_embedded_controller_and_replicas() -> None:
    with _driver(
        """
        serve.run(Ingress.bind(Pid.bind()))
        import psutil
        print(json.dumps({"pids": [p.pid for p in psutil.Process().children(recursive=True)]}),
              flush=True)
        """
    ) as (driver, info):
        pids = info["pids"]
        assert isinstance(pids, list)
        assert len(pids) == 4
        assert driver.wait(60) == 0
        assert not pids_alive(pids)


def test_shutdown_stops_everything_and_a_new_run_starts_afresh() -> None:
    result = run_script(
        APP
        + textwrap.dedent(
            """
            import psutil
            h = serve.run(Ingress.bind(Pid.bind()))
            first = h.remote().result()
            serve.shutdown()
            assert not psutil.Process().children(recursive=True)
            h = serve.run(Ingress.bind(Pid.bind()))
            assert h.remote().result() != first
            serve.shutdown()
            assert serve.status().applications == {}
            print("ok")
            """
        ),
        timeout_s=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_blocking_run_serves_until_interrupted_then_shuts_down() -> None:
    with _driver(
        """
        import psutil, threading, time
        def report():
            while len(psutil.Process().children(recursive=True)) < 4:
                time.sleep(0.05)
            time.sleep(0.5)
            pids = [p.pid for p in psutil.Process().children(recursive=True)]
            print(json.dumps({"pids": pids}), flush=True)
        threading.Thread(target=report, daemon=True).start()
        serve.run(Ingress.bind(Pid.bind()), blocking=True)
        """
    ) as (driver, info):
        pids = info["pids"]
        assert isinstance(pids, list)
        assert len(pids) == 4
        driver.send_signal(signal.SIGINT)
        assert driver.wait(60) == 0
        assert not pids_alive(pids)


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A serve-controller started by an operator, with its own state directory."""
    state_dir = tmp_path / "state"
    with subprocess.Popen(
        [sys.executable, "-m", "controller", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["event"] == "ready"
            assert ready["pid"] == proc.pid
            assert ready["address"].startswith("127.0.0.1:")
            yield ready["address"], state_dir
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
            kill_tree(proc.pid)


def test_standalone_controller_writes_token_and_record(standalone: tuple[str, Path]) -> None:
    address, state_dir = standalone
    token = state_dir / "token"
    assert token.stat().st_mode & 0o777 == 0o600
    record = json.loads((state_dir / "controller.json").read_text())
    assert record["address"] == address


@pytest.mark.parametrize("how", ["start_address", "SERVE_ADDRESS", "state_dir_record"])
def test_drivers_use_an_existing_controller(standalone: tuple[str, Path], how: str) -> None:
    address, state_dir = standalone
    connect = f"serve.start(address={address!r})\n" if how == "start_address" else ""
    env = {"SERVE_STATE_DIR": str(state_dir)}
    if how == "SERVE_ADDRESS":
        env["SERVE_ADDRESS"] = address
    script = (
        APP
        + connect
        + textwrap.dedent(
            """
        import psutil
        h = serve.run(Ingress.bind(Pid.bind()), name="shared")
        pids = {h.remote().result() for _ in range(40)}
        # the replicas belong to the standalone controller, not to this driver
        assert not psutil.Process().children(recursive=True)
        print(sorted(pids))
        """
        )
    )
    first = run_script(script, env=env)
    assert first.returncode == 0, first.stderr
    # The application outlives the driver that deployed it.
    second = run_script(
        "import serve\n"
        + connect
        + "print(serve.get_app_handle('shared').remote().result())\n"
        + "serve.delete('shared')\n",
        env=env,
    )
    assert second.returncode == 0, second.stderr
    assert int(second.stdout) in json.loads(first.stdout)  # same app, same replicas as before


def test_wrong_address_fails_with_a_clear_error(tmp_path: Path) -> None:
    result = run_script(
        "import serve\nserve.start(address='127.0.0.1:9')\n",
        SERVE_STATE_DIR=str(tmp_path),
    )
    assert result.returncode != 0
    assert "ControllerUnavailableError" in result.stderr
    assert "127.0.0.1:9" in result.stderr


def test_no_serve_process_outlives_this_module() -> None:
    def leftover() -> list[object]:
        ours = {p.pid for p in serve_processes() if p.ppid() == os.getpid()}  # controllers
        # The shared controller's proxy lives as long as the shared controller.
        return [
            p
            for p in serve_processes()
            if p.pid not in ours
            and not (p.ppid() in ours and "serve._proxy" in " ".join(p.cmdline()))
        ]

    wait_for(lambda: not leftover(), timeout_s=30)


@pytest.mark.parametrize("script", ["serve-controller", "serve-replica"])
def test_console_scripts_exist_and_explain_bad_arguments(script: str) -> None:
    path = Path(sys.executable).parent / script
    help_text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0
    assert "--host" in help_text.stdout
    bad = subprocess.run([path, "--port", "99999"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "error:" in bad.stderr


def test_replica_rejects_a_malformed_replica_id() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "replica", "--controller", "127.0.0.1:1", "--replica-id", "x"],
        capture_output=True,
        text=True,
        timeout=30,
        env=python_env(),
    )
    assert result.returncode == 2
    assert "--replica-id must look like app#deployment#tag" in result.stderr
