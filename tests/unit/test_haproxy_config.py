"""HAProxy's configuration and runtime API commands (pure functions), and the configuration
checked by HAProxy itself when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from serve._models import Route
from serve._proxy import haproxy_config as cfg
from tests.support.tls import make_certs


def _front(run_dir: str, **changes: object) -> cfg.Frontend:
    fields: dict[str, object] = {
        "bind": "127.0.0.1:18080",
        "run_dir": run_dir,
        "fallback": "127.0.0.1:18081",
        "max_connections": 1000,
        "max_header_bytes": 16384,
        "max_headers": 100,
        "max_body_bytes": 1 << 20,
        "header_timeout_s": 10.0,
        "body_timeout_s": 30.0,
        "keep_alive_timeout_s": 5.0,
        "balance": "random(2)",
        "nbthread": 1,
    }
    fields.update(changes)
    return cfg.Frontend(**fields)  # type: ignore[arg-type]


def test_slots_double_when_they_run_out() -> None:
    assert cfg.slot_count(0) == cfg.MIN_SLOTS
    assert cfg.slot_count(cfg.MIN_SLOTS + 1) == 2 * cfg.MIN_SLOTS
    assert cfg.slot_count(3, current=32) == 32  # never shrinks


def test_a_slot_book_reuses_a_freed_slot_last() -> None:
    book = cfg.SlotBook()
    assert [book.take(f"r{i}", f"127.0.0.1:{i + 1}") for i in range(3)] == [0, 1, 2]
    book.release("r0")
    assert book.take("r3", "127.0.0.1:9") == 3  # slot 0 waits behind the never-used ones
    assert book.fits([f"n{i}" for i in range(cfg.MIN_SLOTS - 3)])
    assert not book.fits([f"n{i}" for i in range(cfg.MIN_SLOTS - 2)])
    book.grow(cfg.MIN_SLOTS)
    assert len(book.addresses) == 2 * cfg.MIN_SLOTS


def test_a_draining_replica_is_left_out_of_a_reload() -> None:
    book = cfg.SlotBook()
    book.take("a", "127.0.0.1:1")
    book.take("b", "127.0.0.1:2")
    book.draining.add("a")
    assert book.layout()[:3] == (None, "127.0.0.1:2", None)


def test_commands_fill_drain_and_free_a_slot() -> None:
    assert cfg.fill_slot("app-0", 2, "[::1]:8000") == [
        "set server app-0/r2 addr ::1 port 8000",
        "set server app-0/r2 state ready",
    ]
    assert cfg.drain_server("app-0", "r2") == "set server app-0/r2 state drain"
    assert cfg.free_slot("app-0", "r2") == "set server app-0/r2 state maint"


@pytest.mark.parametrize(
    ("command", "answer", "worked"),
    [
        ("set server b/r0 state ready", "\n", True),
        ("set server b/r0 state ready", "No such server.\n", False),
        (
            "set server b/r0 addr 127.0.0.1 port 80",
            "IP changed from '0.0.0.0' to '127.0.0.1', port changed from '1' to '80' by "
            "'stats socket command'\n",
            True,
        ),
        ("set server b/r0 addr 127.0.0.1 port 80", "no need to change the addr\n", True),
        ("set server b/r0 addr 127.0.0.1 port 80", "No such backend.\n", False),
    ],
)
def test_a_refused_command_is_told_from_one_that_worked(
    command: str, answer: str, worked: bool
) -> None:
    assert cfg.command_worked(command, answer) is worked


def test_stats_and_info_are_parsed() -> None:
    stat = (
        "# pxname,svname,qcur,scur,status\n"
        "app-0,FRONTEND,,3,OPEN\n"
        "app-0,r0,0,2,UP\n"
        "app-0,r1,0,,MAINT\n"
        "app-0,BACKEND,0,2,UP\n"
    )
    assert cfg.servers_in_use(stat) == {("app-0", "r0"): (2, "UP"), ("app-0", "r1"): (0, "MAINT")}
    assert cfg.worker_pid("Name: HAProxy\nPid: 4242\nUptime: 0\n") == 4242
    assert cfg.worker_pid("") == 0


def test_routes_longest_prefix_first_from_files() -> None:
    backends = [
        cfg.Backend("app-0", Route("/", "root", "Root"), ("127.0.0.1:1",)),
        cfg.Backend("app-1", Route("/api", "api", "Api"), (None,)),
    ]
    text = cfg.render(_front("/run"), backends)
    assert text.index("use_backend app-1") < text.index("use_backend app-0")
    assert "server r0 127.0.0.1:1 " in text
    assert f"server r0 {cfg.PARKED} " in text
    assert text.count(" disabled") == 1
    files = cfg.files(backends)
    assert files["app-1.path"] == b"/api\n"
    assert files["app-1.beg"] == b"/api/\n"
    assert "app-0.path" not in files  # "/" takes everything
    assert b'"/api":"api"' in files["routes.json"]


def test_grpc_calls_go_by_application_metadata_to_the_replicas_grpc_ports() -> None:
    front = _front("/run", grpc_bind="fd@4", grpc_fallback="127.0.0.1:9")
    http = cfg.Backend("app-0", Route("/a", "a", "A"), ("127.0.0.1:1",))
    grpc_a = cfg.Backend("grpc-1", Route("/a", "a", "A"), ("127.0.0.1:2", None), True, (1, None))
    text = cfg.render(front, [http, grpc_a])
    grpc_part = text[text.index("frontend serve-grpc") :]
    assert "bind fd@4 proto h2" in grpc_part
    assert "use_backend grpc-1 if { req.hdr(application) -m str -f /run/grpc-1.app }" in grpc_part
    # One application: a call without the metadata goes to it too.
    assert "use_backend grpc-1 if !{ req.hdr(application) -m found }" in grpc_part
    # Ray's API and health services, and unknown applications: the serve-proxy answers.
    assert f"use_backend {cfg.GRPC_FALLBACK} if serve_services" in grpc_part
    assert f"default_backend {cfg.GRPC_FALLBACK}" in grpc_part
    # HTTP/2 to the replica's gRPC port, checked on its HTTP port over HTTP/1.1.
    assert "server r0 127.0.0.1:2 " in grpc_part
    assert "proto h2 check-proto h1 port 1" in grpc_part
    assert "server fallback 127.0.0.1:9 proto h2 backup" in grpc_part
    assert "grpc-1" not in text[: text.index("frontend serve-grpc")]  # not an HTTP route
    files = cfg.files([http, grpc_a])
    assert files["grpc-1.app"] == b"a\n"
    assert b"grpc" not in files["routes.json"]
    # Two applications: no default one.
    grpc_b = cfg.Backend("grpc-2", Route("", "b", "B"), (None,), True)
    assert "!{ req.hdr(application) -m found }" not in cfg.render(front, [grpc_a, grpc_b])
    # No gRPC port: no gRPC frontend.
    assert "serve-grpc" not in cfg.render(_front("/run"), [http])


def test_a_grpc_slot_is_filled_with_its_check_port() -> None:
    assert cfg.fill_slot("grpc-1", 0, "127.0.0.1:2", 1) == [
        "set server grpc-1/r0 addr 127.0.0.1 port 2",
        "set server grpc-1/r0 check-port 1",
        "set server grpc-1/r0 state ready",
    ]
    assert cfg.command_worked("set server grpc-1/r0 check-port 1", "\n")


def test_healthz_is_503_until_an_application_is_routed() -> None:
    assert "status 503" in cfg.render(_front("/run"), [])
    routed = cfg.render(_front("/run"), [cfg.Backend("app-0", Route("/a", "a", "A"))])
    assert "string success if healthz" in routed
    # Once exposed, healthy for good (as the proxy): all applications deleted is still 200.
    assert "string success if healthz" in cfg.render(_front("/run"), [], exposed=True)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="HAProxy is not installed")
@pytest.mark.parametrize("tls", [False, True])
def test_haproxy_accepts_the_configuration(tmp_path: Path, tls: bool) -> None:
    """HAProxy's own check (``haproxy -c``) of a configuration with every kind of route."""
    pem = tmp_path / "tls.pem"
    if tls:
        certs = make_certs(tmp_path)
        cert, key = Path(certs["SERVE_TLS_CERT"]), Path(certs["SERVE_TLS_KEY"])
        pem.write_bytes(cert.read_bytes() + b"\n" + key.read_bytes())
    backends = [
        cfg.Backend("app-0", Route("/", "root", "Root"), ("127.0.0.1:1", None)),
        cfg.Backend("app-1", Route("/api", "api", "Api"), ("[::1]:2",)),
        cfg.Backend("grpc-2", Route("", "rpc", "Rpc"), ("127.0.0.1:3", None), True, (4, None)),
    ]
    for name, content in cfg.files(backends).items():
        (tmp_path / name).write_bytes(content)
    config = tmp_path / "haproxy.cfg"
    front = _front(
        str(tmp_path),
        tls_pem=str(pem) if tls else "",
        grpc_bind="127.0.0.1:18082",
        grpc_fallback="127.0.0.1:18083",
    )
    config.write_text(cfg.render(front, backends))
    checked = subprocess.run(
        ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr
    assert "[WARNING]" not in checked.stderr, checked.stderr
