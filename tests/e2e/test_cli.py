"""The `serve` command, driven as a subprocess against real daemons."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serve._config_file import load_config
from tests.support.procs import (
    ROOT,
    kill_tree,
    pids_alive,
    python_env,
    replica_pids_of,
    run_script,
    wait_for,
)

pytestmark = pytest.mark.e2e

SERVE = [sys.executable, "-m", "serve"]


def serve_cmd(
    *args: str, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, *args], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`serve start` in a private state directory; everything stopped afterwards."""
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "state"))
    env.pop("SERVE_LOG_LEVEL", None)  # as a user's shell: the daemons log at INFO
    started = serve_cmd("start", env=env)
    assert started.returncode == 0, started.stderr
    assert "serve controller running at 127.0.0.1:" in started.stdout
    record = json.loads((tmp_path / "state" / "controller.json").read_text())
    try:
        yield env
    finally:
        serve_cmd("shutdown", env=env)
        wait_for(lambda: not pids_alive([record["pid"]]), timeout_s=30)
        kill_tree(record["pid"])


def call(env: dict[str, str], app: str, arg: str) -> str:
    result = run_script(
        f"import serve\nprint(serve.get_app_handle({app!r}).remote({arg!r}).result())\n", env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_deploy_status_redeploy_delete_shutdown(cluster: dict[str, str], tmp_path: Path) -> None:
    deployed = serve_cmd("deploy", "examples/config.yaml", "--wait", env=cluster)
    assert deployed.returncode == 0, deployed.stderr
    assert "Sent deploy request for ['echo', 'greeter']" in deployed.stdout
    assert call(cluster, "greeter", "Ada") == "Howdy Ada!"  # user_config from the file
    assert call(cluster, "echo", "hi") == "echo: hi"  # args passed to the builder

    status = json.loads(serve_cmd("status", "--json", env=cluster).stdout)["applications"]
    assert status["greeter"]["status"] == "RUNNING"
    assert status["greeter"]["deployments"]["Greeter"]["replica_states"] == {"RUNNING": 2}
    table = serve_cmd("status", env=cluster).stdout
    assert "greeter" in table
    assert "Greeter" in table
    assert "RUNNING: 2" in table

    # Declarative: deploying a file without `echo` removes it.
    config = yaml.safe_load(Path(ROOT / "examples/config.yaml").read_text())
    config["applications"] = [a for a in config["applications"] if a["name"] == "greeter"]
    smaller = tmp_path / "smaller.yaml"
    smaller.write_text(yaml.safe_dump(config))
    assert serve_cmd("deploy", str(smaller), "--wait", env=cluster).returncode == 0
    wait_for(
        lambda: (
            "echo"
            not in json.loads(serve_cmd("status", "--json", env=cluster).stdout)["applications"]
        )
    )

    assert serve_cmd("delete", "greeter", env=cluster).returncode == 0
    assert json.loads(serve_cmd("status", "--json", env=cluster).stdout)["applications"] == {}
    missing = serve_cmd("delete", "greeter", env=cluster)
    assert missing.returncode == 1
    assert "no application 'greeter'" in missing.stderr


def test_redeploying_unchanged_code_keeps_every_replica(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    assert serve_cmd("deploy", "examples/config.yaml", "--wait", env=cluster).returncode == 0
    state_dir = Path(cluster["SERVE_STATE_DIR"])
    address = json.loads((state_dir / "controller.json").read_text())["address"]
    before = replica_pids_of(address)
    assert len(before) == 4  # Greeter x2, Front, Echo

    # The same file again (another process, so other pickles): nothing restarts.
    assert serve_cmd("deploy", "examples/config.yaml", "--wait", env=cluster).returncode == 0
    assert replica_pids_of(address) == before

    # A user_config change is applied in place.
    config = yaml.safe_load(Path(ROOT / "examples/config.yaml").read_text())
    config["applications"][0]["deployments"][0]["user_config"] = {"greeting": "Hiya"}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert serve_cmd("deploy", str(changed), "--wait", env=cluster).returncode == 0
    wait_for(lambda: call(cluster, "greeter", "Ada") == "Hiya Ada!", timeout_s=30)
    assert replica_pids_of(address) == before

    # `serve start` quiets the CLI, not the daemon's logs: lifecycle and access lines are there.
    logs = state_dir / "logs"
    assert "Deploying application 'greeter'" in (logs / "controller.log").read_text()

    def access_logged() -> bool:
        replica_logs = logs.glob("replica_greeter_Greeter_*.log")
        return "__call__ OK" in "".join(p.read_text() for p in replica_logs)

    wait_for(access_logged, timeout_s=10)


def test_bad_config_files_are_rejected_with_their_position(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "applications:\n"
        "  - name: x\n"
        "    import_path: examples.apps:app\n"
        "    deployments:\n"
        "      - name: Greeter\n"
        "        max_ongoing_requests: -3\n"
    )
    result = serve_cmd("deploy", str(bad), env=cluster)
    assert result.returncode == 1
    assert f"{bad}:6:31: max_ongoing_requests must be >= 1, got -3." in result.stderr
    bad.write_text("applications:\n  - import_path: examples.apps:app\n    replicas: 2\n")
    result = serve_cmd("deploy", str(bad), env=cluster)
    assert f"{bad}:3:5: unknown key 'replicas'" in result.stderr
    bad.write_text(
        "applications:\n  - import_path: examples.apps:app\n    deployments:\n      - name: Nope\n"
    )
    result = serve_cmd("deploy", str(bad), env=cluster)
    assert result.returncode == 1
    assert "has no deployment(s) ['Nope']" in result.stderr


def _serve_run(name: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SERVE, "run", "examples.apps:app", "--name", name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=python_env(SERVE_STATE_DIR=str(tmp_path / "state")),
    )


def test_serve_run_blocks_and_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    with _serve_run("cli-run", tmp_path) as process:
        assert process.stdout is not None
        lines: list[str] = []
        while True:
            line = process.stdout.readline()
            assert line, f"serve run exited early: {lines}"
            lines.append(line)
            if line.startswith("Running"):
                break
        assert any("cli-run:" in line for line in lines)  # progress while replicas start
        children = [
            p.pid for p in __import__("psutil").Process(process.pid).children(recursive=True)
        ]
        assert len(children) == 3  # controller + 2 replicas
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert "Stopped." in process.stdout.read()
    assert not pids_alive(children)


def test_ctrl_c_while_deploying_stops_cleanly(tmp_path: Path) -> None:
    with _serve_run("cli-early", tmp_path) as process:
        assert process.stdout is not None
        first = process.stdout.readline()  # the first progress line: still deploying
        assert "cli-early" in first
        children = [
            p.pid for p in __import__("psutil").Process(process.pid).children(recursive=True)
        ]
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        assert "Stopped." in process.stdout.read()
    wait_for(lambda: not pids_alive(children), timeout_s=10)


def test_build_writes_a_config_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "built.yaml"
    result = serve_cmd("build", "examples.apps:app", "-o", str(out), env=python_env())
    assert result.returncode == 0, result.stderr
    (app,) = load_config(out)
    assert app.import_path == "examples.apps:app"
    assert sorted(d.name for d in app.deployments) == ["Front", "Greeter"]


def test_commands_without_a_controller_say_how_to_start_one(tmp_path: Path) -> None:
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "empty"))
    result = serve_cmd("status", env=env)
    assert result.returncode == 1
    assert "serve start" in result.stderr


def test_an_unreachable_controller_error_mentions_serve_address_only_when_it_is_set(
    tmp_path: Path,
) -> None:
    free = "127.0.0.1:9"  # nothing listens on the discard port here
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "empty"))
    by_flag = serve_cmd("status", "--address", free, env=env)
    assert by_flag.returncode == 1
    assert "no serve controller answered" in by_flag.stderr
    assert "unset SERVE_ADDRESS" not in by_flag.stderr
    by_env = serve_cmd("status", env={**env, "SERVE_ADDRESS": free})
    assert by_env.returncode == 1
    assert "unset SERVE_ADDRESS" in by_env.stderr


def test_start_and_status_link_the_dashboard(tmp_path: Path) -> None:
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "state"))
    started = serve_cmd("start", "--proxy-location", "Disabled", env=env)
    try:
        assert started.returncode == 0, started.stderr
        line = next(x for x in started.stdout.splitlines() if x.startswith("Dashboard at "))
        url = line.split()[2]
        assert url.startswith("http://127.0.0.1:")
        assert "(Prometheus metrics at /metrics)" in line
        with urllib.request.urlopen(url, timeout=10) as page:
            assert b"dashboard.js" in page.read()
        status = serve_cmd("status", env=env)
        assert f"Dashboard: {url}" in status.stdout
        as_json = json.loads(serve_cmd("status", "--json", env=env).stdout)
        assert as_json["dashboard_url"] == url
    finally:
        serve_cmd("shutdown", env=env)
        record = tmp_path / "state" / "controller.json"
        if record.exists():
            kill_tree(json.loads(record.read_text())["pid"])


def test_a_typed_builder_gets_validated_args_and_bad_args_are_reported_cleanly(
    cluster: dict[str, str],
) -> None:
    target = "examples.app_builders:build_typed"
    started = serve_cmd("run", target, "greeting=Hi there", "excited=true", "--name", "typed",
                        "--non-blocking", env=cluster)  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert call(cluster, "typed", "Ada") == "Hi there, Ada!"  # "true" validated into a bool

    missing = serve_cmd("run", target, "--name", "typed2", "--non-blocking", env=cluster)
    assert missing.returncode == 1
    assert "do not fit GreeterArgs" in missing.stderr
    assert "greeting" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_serve_start_after_a_crash_reuses_the_port_so_replicas_re_link(
    cluster: dict[str, str],
) -> None:
    assert serve_cmd("deploy", "examples/config.yaml", "--wait", env=cluster).returncode == 0
    record = Path(cluster["SERVE_STATE_DIR"]) / "controller.json"
    crashed = json.loads(record.read_text())
    replicas = replica_pids_of(crashed["address"])
    os.kill(crashed["pid"], signal.SIGKILL)  # a crash: the record stays, replicas keep running
    wait_for(lambda: not pids_alive([crashed["pid"]]))
    assert pids_alive(replicas) == replicas

    started = serve_cmd("start", env=cluster)
    assert started.returncode == 0, started.stderr
    assert f"running at {crashed['address']}" in started.stdout
    assert call(cluster, "greeter", "Ada") == "Howdy Ada!"
    status = json.loads(serve_cmd("status", "--json", env=cluster).stdout)["applications"]
    assert status["greeter"]["deployments"]["Greeter"]["replica_states"] == {"RUNNING": 2}
    assert replica_pids_of(crashed["address"]) == replicas  # re-adopted, not restarted


def test_serve_config_prints_what_was_deployed(cluster: dict[str, str]) -> None:
    assert serve_cmd("deploy", "examples/config.yaml", "--wait", env=cluster).returncode == 0
    printed = serve_cmd("config", env=cluster)
    assert printed.returncode == 0, printed.stderr
    documents = [d for d in yaml.safe_load_all(printed.stdout) if d]
    file_apps = yaml.safe_load(Path(ROOT / "examples/config.yaml").read_text())["applications"]
    assert sorted(documents, key=lambda d: d["name"]) == sorted(file_apps, key=lambda d: d["name"])
    one = yaml.safe_load(serve_cmd("config", "--name", "greeter", env=cluster).stdout)
    assert one["import_path"] == "examples.apps:app"
    missing = serve_cmd("config", "--name", "nope", env=cluster)
    assert missing.returncode == 1
    assert "no application 'nope'" in missing.stderr


def test_shutdown_with_a_driver_watching_logs_no_traceback(cluster: dict[str, str]) -> None:
    assert serve_cmd("deploy", "examples/config.yaml", "--wait", env=cluster).returncode == 0
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import serve, time\n"
            "print(serve.get_app_handle('greeter').remote('x').result(), flush=True)\n"
            "time.sleep(30)\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster,
        cwd=ROOT,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "Howdy x!"  # its router watches now
        assert serve_cmd("shutdown", env=cluster).returncode == 0
    finally:
        watcher.kill()
        _, stderr = watcher.communicate(timeout=10)
    state_dir = Path(cluster["SERVE_STATE_DIR"])
    logs = (state_dir / "logs" / "controller.log").read_text()
    logs += (state_dir / "controller.out").read_text()
    assert "Traceback" not in logs
    assert "CancelledError" not in logs + stderr


def served_by_a_replica_itself(root_pid: int) -> str:
    """What the first echo replica under ``root_pid`` answers to ``GET /echo`` on a port of
    its own (direct ingress): "200 echo:"; "" while none does."""
    import psutil

    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            command = process.cmdline()
            if "--replica-id" not in command or not command[
                command.index("--replica-id") + 1
            ].startswith("echo#"):
                continue
            ports = [c.laddr.port for c in process.net_connections("tcp") if c.status == "LISTEN"]
        except psutil.Error:
            continue
        for port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo", timeout=5) as reply:
                    return f"{reply.status} {reply.read().decode()[:5]}"
            except (OSError, http.client.HTTPException):  # its internal gRPC port
                continue
    return ""


ECHO_APP = """
applications:
  - name: echo
    route_prefix: /echo
    import_path: examples.apps:build_echo
    args: {prefix: "echo: "}
"""


def test_the_config_files_http_options_switch_direct_ingress_on(tmp_path: Path) -> None:
    """``http_options: {direct_ingress: true}`` in the file `serve run` starts a controller
    with: the ingress replica serves HTTP itself, on its own port."""
    config = tmp_path / "direct.yaml"
    config.write_text("http_options:\n  port: 0\n  direct_ingress: true\n" + ECHO_APP)
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "state"))
    with subprocess.Popen(
        [*SERVE, "run", str(config)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    ) as process:
        try:
            assert process.stdout is not None
            lines: list[str] = []
            while not lines or not lines[-1].startswith("Running"):
                line = process.stdout.readline()
                assert line, f"serve run exited early: {lines}"
                lines.append(line)
            assert wait_for(lambda: served_by_a_replica_itself(process.pid)) == "200 echo:"
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(60) == 0


def test_serve_start_direct_ingress_flag_switches_it_on(tmp_path: Path) -> None:
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "state"))
    started = serve_cmd("start", "--direct-ingress", env=env)
    assert started.returncode == 0, started.stderr
    record = json.loads((tmp_path / "state" / "controller.json").read_text())
    try:
        config = tmp_path / "echo.yaml"
        config.write_text(ECHO_APP)
        deployed = serve_cmd("deploy", str(config), "--wait", env=env)
        assert deployed.returncode == 0, deployed.stderr
        assert wait_for(lambda: served_by_a_replica_itself(record["pid"])) == "200 echo:"
    finally:
        serve_cmd("shutdown", env=env)
        wait_for(lambda: not pids_alive([record["pid"]]), timeout_s=30)
        kill_tree(record["pid"])


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ("direct_ingress: yes please", "http_options.direct_ingress must be true or false"),
        ("ha_proxy: 1", "http_options.ha_proxy must be true or false, got 1."),
        ("direct_ingres: true", "Unknown http_options field(s) ['direct_ingres']"),
    ],
)
def test_a_bad_ingress_mode_in_the_config_file_is_refused(
    tmp_path: Path, options: str, error: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"http_options:\n  {options}\n" + ECHO_APP)
    env = python_env(SERVE_STATE_DIR=str(tmp_path / "state"))
    result = serve_cmd("run", str(config), env=env, timeout_s=60)
    assert result.returncode == 1
    assert error in result.stderr, result.stderr
    assert str(config) in result.stderr
    assert not (tmp_path / "state" / "controller.json").exists()  # nothing was started
