"""`make bench`'s peers (scripts/bench_peers.py): a failed install is one line and no rows, the
figures are same-round ratios, and a peer's server leaves no process behind, even one that left
its process group as Ray's actors do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from scripts.bench_peers import (
    OURS,
    PEERS,
    RAY_HAPROXY,
    Peer,
    available_peers,
    peer_rows,
    peer_server,
    peers_table,
    summarize_peers,
)

ROOT = Path(__file__).resolve().parents[2]


def test_a_failed_install_is_one_line_per_peer_and_no_stamp(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "bench_peers_setup.sh"), str(tmp_path / "peers")],
        env={**os.environ, "PEERS_PYTHON": "false"},  # no venv can be made
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0  # the bench goes on without them
    lines = done.stderr.splitlines()
    assert len(lines) == len({p.venv for p in PEERS})
    assert all(line.startswith("bench peers: ") and " skipped: " in line for line in lines)
    assert not list((tmp_path / "peers").glob("*/.installed"))


def test_only_installed_peers_are_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / ".installed").touch()
    assert [p.name for p in available_peers(tmp_path)] == ["ray", RAY_HAPROXY]
    skipped = capsys.readouterr().err.splitlines()
    assert len(skipped) == 2
    assert "LitServe" in skipped[0]
    assert "BentoML" in skipped[1]


def _figures(rps: float, p50_us: float) -> dict[str, Any]:
    return {
        "c64": {"rps": rps, "errors": 0},
        "c1": {"p50_us": p50_us, "errors": 0},
        "total_s": 30.0,
    }


def test_summary_is_medians_of_same_round_ratios_over_completed_rounds() -> None:
    floors = [_figures(10_000, 80), _figures(20_000, 90), _figures(40_000, 100)]
    runs = [
        {"ray": _figures(1_000, 4_000), RAY_HAPROXY: _figures(3_000, 500)},
        {"ray": {"error": "did not answer"}, RAY_HAPROXY: _figures(4_000, 600)},
        {"ray": _figures(3_000, 5_000), RAY_HAPROXY: _figures(4_000, 550)},
    ]
    summary = summarize_peers(runs, floors)
    assert set(summary) == {"ray", RAY_HAPROXY}
    ray = summary["ray"]
    assert ray["rounds"] == 2
    assert ray["rps_64"] == 2_000
    assert ray["rps_ratio"] == pytest.approx((0.1 + 0.075) / 2)  # its rounds 1 and 3 only
    assert ray["p50_us_1"] == 4_500
    assert summary[RAY_HAPROXY]["rps_ratio"] == pytest.approx(0.2)  # of 0.3, 0.2, 0.1


def test_rows_say_how_far_ours_are_ahead_of_rays_haproxy_mode() -> None:
    floors = [_figures(40_000, 100)] * 3
    peer_runs = [
        {RAY_HAPROXY: _figures(5_000, 500)},
        {RAY_HAPROXY: {"error": "did not answer"}},
        {RAY_HAPROXY: _figures(2_000, 1_000)},
    ]
    fast = {
        "summary": {"floor": {"rps_64": 40_000, "p50_us_1": 100}},
        "runs": {
            "haproxy_noop": [_figures(20_000, 200), _figures(1, 1), _figures(20_000, 200)],
            "proxy_noop": [_figures(10_000, 800), _figures(1, 1), _figures(10_000, 800)],
        },
        "peer_runs": peer_runs,
        "peers": summarize_peers(peer_runs, floors),
    }
    rows = {r["name"]: r for r in peer_rows(fast)}
    anchor = rows["Ray Serve 2.60, HAProxy mode, 64 conn (2 rounds)"]
    assert anchor["ratio"] == pytest.approx(0.0875)  # of 0.125 and 0.05
    # Same-round ratios (4 and 10, 0.4 and 0.2, ...), the round Ray failed left out.
    assert rows["HAProxy + direct noop / Ray HAProxy mode, req/s"]["value"] == 7.0
    assert rows["HAProxy + direct noop / Ray HAProxy mode, p50"]["value"] == pytest.approx(0.3)
    assert rows["default proxy noop / Ray HAProxy mode, req/s"]["value"] == 3.5
    assert rows["default proxy noop / Ray HAProxy mode, p50"]["value"] == pytest.approx(1.2)


# A peer stand-in: it answers "ok" from a grandchild in a session of its own (as Ray's actors
# and their HAProxy are), and waits on stdin; closing stdin ends only the parent.
ESCAPING_SERVER = textwrap.dedent(
    """
    import subprocess, sys
    SERVE = '''
    import http.server, sys
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
    '''
    subprocess.Popen([sys.executable, "-c", SERVE, sys.argv[2]], start_new_session=True)
    sys.stdin.read()
    """
)


def test_a_peer_server_leaves_no_process_behind(tmp_path: Path) -> None:
    (tmp_path / "fake" / "bin").mkdir(parents=True)
    (tmp_path / "fake" / "bin" / "python").symlink_to(sys.executable)
    script = tmp_path / "server.py"
    script.write_text(ESCAPING_SERVER)
    peer = Peer("fake", "a stand-in", "fake", stop_by_stdin=True, exit_grace_s=0.5)
    with peer_server(peer, tmp_path, script) as server:
        tree = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children()]
        assert len(tree) == 2
        assert os.getpgid(tree[1].pid) != os.getpgid(tree[0].pid)
        assert server.listener == tree[1].name()
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.read() == b"ok"
    _, alive = psutil.wait_procs(tree, timeout=5)
    for process in alive:  # a failing harness must not leak the stand-in either
        process.kill()
    assert alive == []


def test_the_table_has_ours_then_the_peers_each_against_its_rounds_uvicorn() -> None:
    floors = [_figures(10_000, 80), _figures(20_000, 90)]
    ours = {key: [_figures(5_000, 100), _figures(5_000, 300)] for key, _ in OURS}
    failed = {"c64": {"rps": 2_000, "errors": 7}, "c1": {"p50_us": 900, "errors": 0}}
    fast = {
        "runs": {**ours, "floor": floors},
        "summary": {key: {"errors": 0} for key, _ in OURS},
        "peers": summarize_peers([{"ray": {**failed, "total_s": 1.0}}] * 2, floors),
    }
    lines = peers_table(fast)
    assert len(lines) == 1 + len(OURS) + 1
    assert lines[3].startswith("ours, default proxy, plain __call__ ")
    assert lines[3].split()[-4:] == ["5,000", "0.38", "200", "us"]  # 0.38: of 0.5 and 0.25
    assert lines[-1].startswith("Ray Serve 2.60, default proxy ")
    assert lines[-1].endswith(" 2,000      0.15       900 us  (14 requests failed)")
