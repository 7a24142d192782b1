"""The controller's dashboard in a real browser (Debian's headless Chromium): tables, charts
with data, a replica's log, traces, a killed replica replaced on the page; and its front door
(loopback Host check, the cluster token beyond loopback)."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import headless_chromium, save_screenshot
from tests.support.procs import StandaloneController, run_script, wait_for

pytestmark = pytest.mark.e2e

LOAD = textwrap.dedent(
    """
    import serve
    from serve.handle import DeploymentHandle

    @serve.deployment(num_replicas=2)
    class Model:
        def __call__(self, x):
            if x % 25 == 0:
                raise ValueError("every 25th fails")
            return x * 2

    @serve.deployment
    class Ingress:
        def __init__(self, model: DeploymentHandle):
            self.model = model

        async def __call__(self, x):
            try:
                return await self.model.remote(x)
            except ValueError:
                return -1

    handle = serve.run(Ingress.bind(Model.bind()), name="dash", route_prefix=None)
    for i in range(1, 301):  # bounded: 300 requests
        handle.remote(i).result(timeout_s=30)
    print("sent", flush=True)
    """
)


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[StandaloneController]:
    c = StandaloneController(
        tmp_path / "state",
        "--metrics-port",
        "0",
        SERVE_METRICS_INTERVAL_S="0.5",
        SERVE_LOG_LEVEL="INFO",  # the replicas' access lines, for the log panel
        SERVE_TRACING_EXPORTER_IMPORT_PATH="serve._tracing:default_tracing_exporter",
        SERVE_TRACING_SAMPLING_RATIO="1.0",
    )
    try:
        yield c.start()
    finally:
        c.cleanup()


# The page redraws every 2 s: read it in one script, never through element references kept
# across a redraw.
ROWS = """
return [...document.querySelectorAll("#replicas tbody tr[data-replica-id]")].map((row) => ({
  id: row.dataset.replicaId, pid: row.dataset.pid,
  deployment: row.cells[1].textContent, state: row.cells[2].textContent}));
"""
CHART = """
const svg = document.querySelector(
  `svg.chart[data-series="${arguments[0]}"][data-deployment="${arguments[1]}"]`);
return svg ? [Number(svg.dataset.points), Number(svg.dataset.max)] : [0, 0];
"""


def rows(driver: Any) -> list[dict[str, str]]:
    """The replicas table as the page shows it."""
    return driver.execute_script(ROWS)


def click(driver: Any, selector: str) -> None:
    """Click what ``selector`` finds, again if a redraw replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked() -> bool:
        try:
            driver.find_element("css selector", selector).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_for(clicked, timeout_s=10)


def running(driver: Any, deployment: str) -> list[dict[str, str]]:
    return [r for r in rows(driver) if r["deployment"] == deployment and r["state"] == "RUNNING"]


def test_the_dashboard_shows_the_graph_live_in_a_browser(
    controller: StandaloneController,
) -> None:
    url = controller.ready["dashboard"]
    assert url.startswith("http://127.0.0.1:")
    result = run_script(LOAD, timeout_s=120, env=controller.driver_env())
    assert result.returncode == 0, result.stderr

    with headless_chromium() as driver:
        driver.get(url)
        # Tables: the application, both deployments, three replicas running.
        wait_for(lambda: len(running(driver, "dash.Model")) == 2, timeout_s=30)
        assert len(running(driver, "dash.Ingress")) == 1
        app_status = driver.execute_script(
            "return document.querySelector('#applications tr[data-app=\"dash\"]').textContent"
        )
        assert "RUNNING" in app_status

        # Charts have data points, and the requests/s chart saw the traffic.
        def chart(series: str) -> tuple[int, float]:
            points, top = driver.execute_script(CHART, series, "dash.Model")
            return int(points), float(top)

        wait_for(lambda: chart("rps")[1] > 0, timeout_s=30)
        for series in ("rps", "latency", "errors", "replicas"):
            assert chart(series)[0] > 0, series
        assert chart("latency")[1] > 0
        assert chart("errors")[1] > 0
        assert chart("replicas")[1] == 2

        # A replica's recent log lines.
        victim = running(driver, "dash.Model")[0]
        click(driver, f'#replicas tr[data-replica-id="{victim["id"]}"] button')
        wait_for(
            lambda: "serve.access" in driver.find_element("id", "log-lines").text, timeout_s=15
        )
        assert victim["id"] in driver.find_element("id", "log-replica").text

        # Recent traces (tracing is on): a trace's spans drawn when picked.
        wait_for(
            lambda: driver.find_elements("css selector", "#traces tr[data-trace-id]"), timeout_s=30
        )
        click(driver, "#traces tr[data-trace-id]")
        wait_for(lambda: driver.find_elements("css selector", "#waterfall .span"), timeout_s=10)
        assert "replica_handle_request" in driver.find_element("id", "waterfall").text

        # Kill a replica: the page shows its replacement.
        os.kill(int(victim["pid"]), signal.SIGKILL)

        def replaced() -> bool:
            model = running(driver, "dash.Model")
            ids = {r["id"] for r in rows(driver)}
            return len(model) == 2 and victim["id"] not in ids

        wait_for(replaced, timeout_s=60)
        shot = save_screenshot(driver, "dashboard.png")
        assert shot.stat().st_size > 10_000
        assert not [
            entry
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon" not in entry["message"]
        ]


def test_the_dashboard_api_and_its_loopback_guard(controller: StandaloneController) -> None:
    url = controller.ready["dashboard"]
    status, headers, body = _get(url)
    assert status == 200
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b"dashboard.js" in body
    status, _, body = _get(url + "api/state")
    assert status == 200
    state = json.loads(body)
    assert state["controller"]["address"] == controller.address
    assert state["window_s"] == 900
    # A web page whose DNS name points at 127.0.0.1 gets nothing (DNS rebinding).
    assert _get(url + "api/state", Host="attacker.example")[0] == 421
    assert _get(url, Host="localhost")[0] == 200
    # Scrapers of /metrics are not affected.
    assert _get(url + "metrics", Host="prometheus.example")[0] == 200
    status, _, body = _get(url + "api/logs?replica=../../token")
    assert status == 404
    assert b"No replica" in body
    assert _get(url + "api/logs?replica=x&lines=many")[0] == 400
    assert _get(url + "nothing-here")[0] == 404
    assert _get(url + "api/state?" + "x" * 2000)[0] == 414
    request = urllib.request.Request(url + "api/state", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    refused.value.close()
    assert refused.value.code == 405


def test_beyond_loopback_the_dashboard_needs_the_cluster_token(tmp_path: Path) -> None:
    c = StandaloneController(tmp_path / "state", "--metrics-port", "0", "--metrics-host", "0.0.0.0")
    try:
        c.start()
        port = c.ready["metrics"].rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}/"
        token = (tmp_path / "state" / "token").read_text().strip()
        assert _get(base)[0] == 401
        assert _get(base + "api/state", Cookie="serve_token=wrong")[0] == 401
        assert _get(base + "api/state", Authorization=f"Bearer {token}")[0] == 200

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as login:
            opener.open(base + f"?token={token}", timeout=10)
        login.value.close()
        assert login.value.code == 303
        assert login.value.headers["Location"] == "/"
        cookie = login.value.headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        status, _, body = _get(base + "api/state", Cookie=cookie.split(";", 1)[0])
        assert status == 200
        assert json.loads(body)["applications"] == []
        assert _get(base + "?token=wrong")[0] == 401
    finally:
        c.cleanup()


EMBEDDED = textwrap.dedent(
    """
    import json, urllib.request
    import serve

    @serve.deployment
    def hello() -> str:
        return "hello"

    serve.run(hello.bind(), name="embedded", route_prefix=None)
    url = serve.status().dashboard_url
    state = ""
    if url:
        with urllib.request.urlopen(url + "api/state", timeout=10) as response:
            state = [a["name"] for a in json.loads(response.read())["applications"]]
    print(json.dumps({"url": url, "apps": state}))
    """
)


@pytest.mark.parametrize("port", ["0", "off"])
def test_a_program_with_an_embedded_controller_gets_a_dashboard(port: str) -> None:
    """serve.run alone (no `serve start`): the embedded controller serves the dashboard on a
    free loopback port, unless SERVE_DASHBOARD_PORT=off."""
    result = run_script(EMBEDDED, env={"SERVE_DASHBOARD_PORT": port})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    if port == "off":
        assert seen == {"url": "", "apps": ""}
    else:
        assert seen["url"].startswith("http://127.0.0.1:")
        assert seen["apps"] == ["embedded"]
