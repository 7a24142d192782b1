"""The dashboard: a web page served by the controller beside ``/metrics`` (same port, same
rules: open on loopback, the cluster token beyond it).

It shows applications, deployments (replica counts by state, what handles queue), each
replica (node, pid, version, state, ongoing requests against its limit, why it is pending),
the proxies, 15-minute charts per deployment (requests/s, p50/p99 latency, errors/s,
replicas, with the autoscaler's decisions), a replica's recent log lines, and recent traces
when the default exporter writes them. Static files ship in the package (no CDN, no build
step); the page polls ``/api/state`` (a few KB) every 2 seconds.

The state is read on the controller's loop, at once; files (logs, spans) are read in the
HTTP server's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson

from controller.autoscale import LoadSource
from controller.history import History, Point
from controller.launcher import replica_log_file
from controller.spans import log_tail, read_spans, recent_traces
from controller.state import AppGoal, DeploymentView, Phase, ReplicaRecord
from serve._models import ApplicationStatus, DeploymentID
from serve._tracing import spans_dir

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "dashboard_static"
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
READ_TIMEOUT_S = 5.0
MAX_QUERY_BYTES = 1024
SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


class ControllerReader(Protocol):
    """What the dashboard reads of the controller (on its loop)."""

    @property
    def apps(self) -> Mapping[str, AppGoal]: ...
    @property
    def replicas(self) -> Mapping[str, ReplicaRecord]: ...
    @property
    def load_sources(self) -> Mapping[DeploymentID, Mapping[str, LoadSource]]: ...
    def deployment_views(self, app: AppGoal) -> dict[str, DeploymentView]: ...
    def app_status(self, app: AppGoal) -> tuple[ApplicationStatus, str]: ...


class ProxyReader(Protocol):
    def statuses(self) -> Iterable[Any]: ...


def running_counts(
    apps: Iterable[AppGoal], replicas: Iterable[ReplicaRecord]
) -> dict[DeploymentID, int]:
    """Running (routable) replicas of every deployment that exists."""
    counts = {
        goal.deployment_id: 0
        for app in apps
        if not app.deleting
        for goal in app.deployments.values()
    }
    for record in replicas:
        if record.phase.routable and record.deployment_id in counts:
            counts[record.deployment_id] += 1
    return counts


def _series(points: list[Point]) -> dict[str, list[Any]]:
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "t": [round(p.at_s, 1) for p in points],
        "rps": [r(p.requests_per_s) for p in points],
        "errors": [r(p.errors_per_s) for p in points],
        "p50": [r(p.p50_ms) for p in points],
        "p99": [r(p.p99_ms) for p in points],
        "replicas": [p.replicas for p in points],
    }


def state_view(
    controller: ControllerReader,
    proxies: Iterable[Any],
    series: Mapping[DeploymentID, list[Point]],
    now_s: float,
) -> dict[str, Any]:
    """Everything ``/api/state`` shows (``now_s``: monotonic, for replica ages)."""
    sources = controller.load_sources
    replica_rows = []
    by_deployment: dict[DeploymentID, list[ReplicaRecord]] = {}
    for record in sorted(controller.replicas.values(), key=lambda r: r.replica_id):
        by_deployment.setdefault(record.deployment_id, []).append(record)
        source = sources.get(record.deployment_id, {}).get(record.replica_id)
        state = record.phase.value
        if record.phase is Phase.STARTING and record.pending:
            state = "PENDING"
        replica_rows.append(
            {
                "id": record.replica_id,
                "tag": record.replica_id.rsplit("#", 1)[-1],
                "app": record.deployment_id.app_name,
                "deployment": record.deployment_id.name,
                "state": state,
                "node": record.host,
                "pid": record.pid,
                "version": record.code_version,
                "ongoing": round(source.ongoing, 2) if source is not None else None,
                "max_ongoing": record.max_ongoing_requests or None,
                "rank": record.rank,
                "age_s": round(now_s - record.started_at_s, 1),
                "pending": record.pending,
                "health_failures": record.health_failures,
            }
        )
    applications, deployments = [], []
    for app in sorted(controller.apps.values(), key=lambda a: a.name):
        status, message = controller.app_status(app)
        views = controller.deployment_views(app)
        applications.append(
            {
                "name": app.name,
                "status": "DELETING" if app.deleting else status.value,
                "message": message,
                "route_prefix": app.route_prefix,
                "ingress": app.ingress,
                "deployed_at_s": app.deployed_at_s,
                "deployments": sorted(views),
            }
        )
        for name, view in sorted(views.items()):
            goal = app.deployments[name]
            deployment_id = goal.deployment_id
            by_source = sources.get(deployment_id, {})
            auto = goal.spec.config.autoscaling_config
            deployments.append(
                {
                    "app": app.name,
                    "name": name,
                    "status": view.status.value,
                    "message": view.message,
                    "target_replicas": goal.target_replicas,
                    "replica_states": view.replica_states,
                    "queued": round(sum(s.ongoing for s in by_source.values() if s.is_handle), 2),
                    "ongoing": round(
                        sum(s.ongoing for s in by_source.values() if not s.is_handle), 2
                    ),
                    "autoscaling": None
                    if auto is None
                    else {
                        "min_replicas": auto.min_replicas,
                        "max_replicas": auto.max_replicas,
                        "decisions": [
                            {
                                "at_s": d.at_s,
                                "from": d.prev_num_replicas,
                                "to": d.curr_num_replicas,
                                "policy": d.policy,
                                "reason": d.reason,
                            }
                            for d in goal.scaling_decisions
                        ],
                    },
                    "series": _series(series.get(deployment_id, [])),
                }
            )
    return {
        "applications": applications,
        "deployments": deployments,
        "replicas": replica_rows,
        "proxies": [
            {
                "node_id": p.node_id,
                "status": p.status,
                "message": p.message,
                "pid": p.pid,
                "http_address": p.http_address,
                "grpc_address": p.grpc_address,
            }
            for p in proxies
        ],
    }


class Dashboard:
    """The controller's dashboard: its history sampler and its WSGI app.

    ``async with Dashboard(...)`` samples every deployment's load into the 15-minute history
    (every report interval, between 1 and 10 seconds) until it closes.
    """

    def __init__(
        self,
        controller: ControllerReader,
        proxies: ProxyReader | None,
        *,
        address: str,
        log_dir: Path,
        report_interval_s: float,
        tracing: Mapping[str, Any],
    ) -> None:
        self._controller = controller
        self._proxies = proxies
        self._log_dir = log_dir
        self._tracing = dict(tracing)
        self._about = {"address": address, "log_dir": str(log_dir), "tracing": self._tracing}
        self.sample_period_s = min(max(report_interval_s, 1.0), 10.0)
        self.history = History(report_interval_s, rate_span_s=self.sample_period_s)
        self._started_s = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._static = {
            path: (STATIC_DIR / name).read_bytes() for path, (name, _) in STATIC_FILES.items()
        }

    async def __aenter__(self) -> Dashboard:
        self.start()
        return self

    def start(self) -> None:
        """Start sampling (on the running loop); the WSGI app reads state on this loop."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._sample_loop(), name="controller:dashboard:history")

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _sample_loop(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:
                logger.exception("Sampling the dashboard's history failed")
            await asyncio.sleep(self.sample_period_s)

    def sample(self) -> None:
        controller = self._controller
        self.history.sample(
            time.monotonic(),
            time.time(),
            controller.load_sources,
            running_counts(controller.apps.values(), controller.replicas.values()),
        )

    # On the loop.

    def state(self) -> dict[str, Any]:
        proxies = self._proxies.statuses() if self._proxies is not None else ()
        now = time.monotonic()
        view = state_view(self._controller, proxies, self.history.series(), now)
        view["controller"] = {**self._about, "uptime_s": round(now - self._started_s, 1)}
        view["generated_at_s"] = time.time()
        view["window_s"] = self.history.window_s
        view["sample_period_s"] = self.sample_period_s
        return view

    def _replica_log(self, replica_id: str) -> Path | None:
        record = self._controller.replicas.get(replica_id)
        return replica_log_file(self._log_dir, record.replica_id) if record is not None else None

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None, "the dashboard serves only while it runs"

        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(READ_TIMEOUT_S)

    # In the HTTP server's thread.

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """The dashboard's pages and API (GET only)."""
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"GET only.\n")
        query_text = environ.get("QUERY_STRING", "")
        if len(query_text) > MAX_QUERY_BYTES:
            return _answer(start_response, "414 URI Too Long", b"Query too long.\n")
        query = urllib.parse.parse_qs(query_text)
        static = STATIC_FILES.get(path)
        if static is not None:
            headers = [("Content-Type", static[1]), ("Cache-Control", "no-cache")]
            start_response("200 OK", headers + SECURITY_HEADERS)
            return [self._static[path]]
        try:
            if path == "/api/state":
                return _json(start_response, self._on_loop(self.state))
            if path == "/api/logs":
                return self._logs(start_response, query)
            if path == "/api/traces":
                return _json(start_response, self._traces())
        except TimeoutError:
            return _answer(start_response, "503 Service Unavailable", b"The controller is busy.\n")
        return _answer(start_response, "404 Not Found", f"No page at {path}.\n".encode())

    def _logs(self, start_response: Callable[..., Any], query: dict[str, list[str]]) -> list[bytes]:
        replica_id = (query.get("replica") or [""])[0]
        try:
            lines = int((query.get("lines") or ["100"])[0])
        except ValueError:
            return _answer(start_response, "400 Bad Request", b"lines must be a number.\n")
        path = self._on_loop(self._replica_log, replica_id)
        if path is None:
            message = f"No replica {replica_id!r} runs now; pick one from the replicas table.\n"
            return _answer(start_response, "404 Not Found", message.encode())
        return _json(
            start_response,
            {"replica": replica_id, "file": str(path), "lines": log_tail(path, lines)},
        )

    def _traces(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self._tracing, "traces": []}
        if self._tracing.get("enabled") and self._tracing.get("file_exporter"):
            out["traces"] = recent_traces(read_spans(spans_dir(self._log_dir)), time.time())
        return out


def _answer(start_response: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), *SECURITY_HEADERS])
    return [body]


def _json(start_response: Callable[..., Any], value: Any) -> list[bytes]:
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    start_response("200 OK", headers + SECURITY_HEADERS)
    return [orjson.dumps(value)]
