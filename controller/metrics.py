"""Prometheus metrics at ``/metrics`` on an opt-in port, with Ray Serve's names where they exist,
and the dashboard (``controller/dashboard.py``) at ``/`` on the same port.

The HTTP server (prometheus_client's WSGI app) runs in its own thread; each scrape asks the
controller's loop for a consistent snapshot and renders it. The port binds loopback unless told
otherwise; bound beyond loopback it lists applications to anyone who can reach it, so it then
requires the cluster token as a bearer token (what Prometheus' ``authorization`` setting sends)
unless the operator opts out. A browser gets the token once, from ``/?token=<token>``, which
sets it as a cookie (HttpOnly, SameSite=Strict) and sends the browser on to ``/``.

On loopback, the dashboard's pages answer only requests that name a loopback host (``Host``),
so a web page the browser visits cannot read them through a DNS name rebound to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import http.cookies
import ipaddress
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import make_server

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import (
    ThreadingWSGIServer,
    _SilentHandler as QuietHandler,
    make_wsgi_app,
)

from serve._metrics import LATENCY_BUCKETS_MS
from serve.metrics import Sample

SCRAPE_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class ReplicaMetrics:
    application: str
    deployment: str
    replica: str
    requests: int
    errors: int
    latency_buckets: tuple[int, ...]
    latency_sum_ms: float
    ongoing: float
    healthy: bool
    models: int
    user_metrics: tuple[Sample, ...] = ()


@dataclasses.dataclass(frozen=True)
class HandleMetrics:
    application: str
    deployment: str
    handle: str
    queued: float
    requests: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything a scrape shows, taken at once on the controller's loop."""

    replicas: list[ReplicaMetrics]
    handles: list[HandleMetrics]
    replica_states: list[tuple[str, str, str, int]]  # application, deployment, state, count
    replica_starts: list[tuple[str, str, int]]  # application, deployment, launches
    application_status: list[tuple[str, str]]  # application, status
    deployment_status: list[tuple[str, str, str]]  # application, deployment, status
    loop_duration_s: float
    loops: int


def render(snapshot: Snapshot) -> Iterator[Any]:
    """The metric families of one snapshot."""
    replica_labels = ["deployment", "replica", "application"]
    requests = CounterMetricFamily(
        "ray_serve_deployment_request_counter",
        "Requests processed by the replica.",
        labels=replica_labels,
    )
    errors = CounterMetricFamily(
        "ray_serve_deployment_error_counter",
        "Requests that raised an exception in the replica.",
        labels=replica_labels,
    )
    latency = HistogramMetricFamily(
        "ray_serve_deployment_processing_latency_ms",
        "Time the replica took to process a request, in milliseconds.",
        labels=replica_labels,
    )
    ongoing = GaugeMetricFamily(
        "ray_serve_replica_processing_queries",
        "Requests running in the replica (average over the last report interval).",
        labels=replica_labels,
    )
    healthy = GaugeMetricFamily(
        "ray_serve_deployment_replica_healthy",
        "1 if the replica passed its last health check, else 0.",
        labels=replica_labels,
    )
    models = GaugeMetricFamily(
        "ray_serve_num_multiplexed_models",
        "Multiplexed models loaded (or loading) in the replica.",
        labels=replica_labels,
    )
    for r in snapshot.replicas:
        labels = [r.deployment, r.replica, r.application]
        requests.add_metric(labels, r.requests)
        errors.add_metric(labels, r.errors)
        if r.latency_buckets:
            bounds = [str(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
            latency.add_metric(
                labels, list(zip(bounds, r.latency_buckets, strict=False)), r.latency_sum_ms
            )
        ongoing.add_metric(labels, r.ongoing)
        healthy.add_metric(labels, 1.0 if r.healthy else 0.0)
        models.add_metric(labels, r.models)
    yield from (requests, errors, latency, ongoing, healthy, models)
    yield from _user_families(snapshot.replicas)

    queued = GaugeMetricFamily(
        "ray_serve_deployment_queued_queries",
        "Requests waiting in handles for a replica.",
        labels=["deployment", "application"],
    )
    router_requests = CounterMetricFamily(
        "ray_serve_num_router_requests",
        "Requests made through handles, per process.",
        labels=["deployment", "application", "handle"],
    )
    queued_by_deployment: dict[tuple[str, str], float] = {}
    for h in snapshot.handles:
        key = (h.deployment, h.application)
        queued_by_deployment[key] = queued_by_deployment.get(key, 0.0) + h.queued
        router_requests.add_metric([h.deployment, h.application, h.handle], h.requests)
    for (deployment, application), value in sorted(queued_by_deployment.items()):
        queued.add_metric([deployment, application], value)
    yield from (queued, router_requests)

    replicas = GaugeMetricFamily(
        "serve_deployment_replicas",
        "Replicas of the deployment in each state.",
        labels=["deployment", "application", "state"],
    )
    for application, deployment, state, count in snapshot.replica_states:
        replicas.add_metric([deployment, application, state], count)
    starts = CounterMetricFamily(
        "ray_serve_deployment_replica_starts",
        "Replica processes launched for the deployment.",
        labels=["deployment", "application"],
    )
    for application, deployment, count in snapshot.replica_starts:
        starts.add_metric([deployment, application], count)
    app_status = GaugeMetricFamily(
        "serve_application_status",
        "1 for the application's current status.",
        labels=["application", "status"],
    )
    for application, status in snapshot.application_status:
        app_status.add_metric([application, status], 1)
    deployment_status = GaugeMetricFamily(
        "serve_deployment_status",
        "1 for the deployment's current status.",
        labels=["deployment", "application", "status"],
    )
    for application, deployment, status in snapshot.deployment_status:
        deployment_status.add_metric([deployment, application, status], 1)
    yield from (replicas, starts, app_status, deployment_status)

    loop = GaugeMetricFamily(
        "ray_serve_controller_control_loop_duration_s",
        "Duration of the controller's last reconcile pass, in seconds.",
    )
    loop.add_metric([], snapshot.loop_duration_s)
    loops = CounterMetricFamily(
        "ray_serve_controller_num_control_loops", "Reconcile passes the controller ran."
    )
    loops.add_metric([], snapshot.loops)
    yield from (loop, loops)


class _Collector:
    def __init__(self, snapshot: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._snapshot = snapshot
        self._loop = loop

    def collect(self) -> Iterator[Any]:
        async def take() -> Snapshot:
            return self._snapshot()  # type: ignore[no-any-return]

        future = asyncio.run_coroutine_threadsafe(take(), self._loop)
        yield from render(future.result(SCRAPE_TIMEOUT_S))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


TOKEN_COOKIE = "serve_token"


def _bearer_guard(app: Any, token: str) -> Callable[..., Iterable[bytes]]:
    """The cluster token, as a bearer token or (a browser) the cookie ``/?token=`` sets."""
    expected = token.encode()

    def valid(given: str) -> bool:
        return hmac.compare_digest(given.encode(), expected)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        bearer = environ.get("HTTP_AUTHORIZATION", "")
        if bearer.startswith("Bearer ") and valid(bearer[len("Bearer ") :]):
            return app(environ, start_response)  # type: ignore[no-any-return]
        cookies = http.cookies.SimpleCookie()
        try:
            cookies.load(environ.get("HTTP_COOKIE", ""))
        except http.cookies.CookieError:
            pass
        cookie = cookies.get(TOKEN_COOKIE)
        if cookie is not None and valid(cookie.value):
            return app(environ, start_response)  # type: ignore[no-any-return]
        given = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]
        if environ.get("PATH_INFO") == "/" and given and valid(given):
            start_response(
                "303 See Other",
                [
                    ("Location", "/"),
                    (
                        "Set-Cookie",
                        f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/",
                    ),
                ],
            )
            return [b""]
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="serve"')],
        )
        return [
            b"Send the cluster token as a bearer token (Authorization: Bearer <token>), for "
            b"example with Prometheus' authorization setting; in a browser, open "
            b"/?token=<token> once (the token is in the state directory's 'token' file).\n"
        ]

    return guarded


def _host_name(header: str) -> str:
    """The host a ``Host`` header names, without its port (or "" if it names none)."""
    try:
        return urllib.parse.urlsplit("//" + header).hostname or ""
    except ValueError:
        return ""


def _dispatch(metrics: Any, dashboard: Any, loopback: bool) -> Callable[..., Iterable[bytes]]:
    """``/metrics`` to Prometheus' app; everything else to the dashboard (if any)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics" or dashboard is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if loopback and not is_loopback(_host_name(environ.get("HTTP_HOST", ""))):
            start_response("421 Misdirected Request", [("Content-Type", "text/plain")])
            return [b"The dashboard answers requests for 127.0.0.1 or localhost only.\n"]
        return dashboard(environ, start_response)  # type: ignore[no-any-return]

    return app


class MetricsServer:
    """Serves /metrics (and the ``dashboard`` WSGI app, if given, at every other path) in a
    thread; ``port`` 0 picks a free port (see ``address``).

    With ``token``, every request must send ``Authorization: Bearer <token>`` (or the cookie).
    """

    def __init__(
        self,
        snapshot: Any,
        host: str,
        port: int,
        token: str | None = None,
        dashboard: Callable[..., Iterable[bytes]] | None = None,
    ) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot, asyncio.get_running_loop()))
        app = _dispatch(make_wsgi_app(registry), dashboard, is_loopback(host))
        if token is not None:
            app = _bearer_guard(app, token)
        self._server = make_server(host, port, app, ThreadingWSGIServer, handler_class=QuietHandler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="serve-metrics", daemon=True
        )
        self._thread.start()
        self.address = f"{host}:{self._server.server_port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _user_families(replicas: list[ReplicaMetrics]) -> Iterator[Any]:
    """serve.metrics from every replica: one family per name, the user's tags plus the
    replica's application, deployment and replica."""
    families: dict[str, Any] = {}
    label_counts: dict[str, int] = {}
    for r in replicas:
        for sample in r.user_metrics:
            tag_keys = [key for key, _ in sample.tags]
            labels = [*tag_keys, "application", "deployment", "replica"]
            values = [value for _, value in sample.tags] + [r.application, r.deployment, r.replica]
            family = families.get(sample.name)
            if family is None:
                kind = {
                    "counter": CounterMetricFamily,
                    "gauge": GaugeMetricFamily,
                    "histogram": HistogramMetricFamily,
                }.get(sample.kind)
                if kind is None:
                    continue
                family = families[sample.name] = kind(
                    sample.name, sample.description or sample.name, labels=labels
                )
                label_counts[sample.name] = len(labels)
            if len(values) != label_counts[sample.name]:
                continue  # the same name with other tag keys: not a valid series of it
            if sample.kind == "histogram":
                bounds = [str(b) for b in sample.boundaries] + ["+Inf"]
                family.add_metric(
                    values, list(zip(bounds, sample.buckets, strict=False)), sample.sum
                )
            else:
                family.add_metric(values, sample.value)
    yield from families.values()
