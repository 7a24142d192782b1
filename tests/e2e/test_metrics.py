"""Prometheus metrics at /metrics, scraped and parsed."""

from __future__ import annotations

import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import StandaloneController, run_script, wait_for

pytestmark = pytest.mark.e2e

DRIVER = textwrap.dedent(
    """
    import serve

    @serve.deployment(num_replicas=2)
    class Counted:
        def __init__(self):
            self.calls = serve.metrics.Counter(
                "counted_calls", "Calls seen by user code.", tag_keys=("outcome",)
            )
            self.sizes = serve.metrics.Histogram("counted_sizes", boundaries=[1, 10])

        def __call__(self, fail=False):
            self.sizes.observe(5)
            if fail:
                self.calls.inc(tags={"outcome": "fail"})
                raise ValueError("asked to fail")
            self.calls.inc(tags={"outcome": "ok"})
            return "ok"

    h = serve.run(Counted.bind(), name="metered")
    for _ in range(20):
        h.remote().result()
    for _ in range(3):
        try:
            h.remote(True).result()
        except ValueError:
            pass
    import time
    time.sleep(1.0)  # let this process's handles report once
    print("sent", flush=True)
    """
)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[StandaloneController]:
    c = StandaloneController(
        tmp_path / "state", "--metrics-port", "0", SERVE_METRICS_INTERVAL_S="0.2"
    )
    try:
        yield c.start()
    finally:
        c.cleanup()


def scrape(address: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return families


def total(samples: list[tuple[str, dict[str, str], float]], name: str) -> float:
    return sum(value for sample, _, value in samples if sample == name)


def test_metrics_count_what_happened(controller: StandaloneController) -> None:
    address = controller.ready["metrics"]
    assert address.startswith("127.0.0.1:")
    result = run_script(DRIVER, env=controller.driver_env())
    assert result.returncode == 0, result.stderr

    def counted() -> dict[str, list[tuple[str, dict[str, str], float]]] | None:
        families = scrape(address)
        requests = families.get("ray_serve_deployment_request_counter", [])
        return (
            families
            if total(requests, "ray_serve_deployment_request_counter_total") == 23
            else None
        )

    families = wait_for(counted, timeout_s=15)
    assert (
        total(
            families["ray_serve_deployment_error_counter"],
            "ray_serve_deployment_error_counter_total",
        )
        == 3
    )

    def user_metrics() -> dict[str, list[tuple[str, dict[str, str], float]]] | None:
        found = scrape(address)
        calls = found.get("counted_calls", [])
        return found if total(calls, "counted_calls_total") == 23 else None

    custom = wait_for(user_metrics, timeout_s=15)
    fails = [v for n, labels, v in custom["counted_calls"] if labels.get("outcome") == "fail"]
    assert sum(fails) == 3
    assert {labels["application"] for _, labels, _ in custom["counted_calls"]} == {"metered"}
    assert total(custom["counted_sizes"], "counted_sizes_count") == 23
    latency = families["ray_serve_deployment_processing_latency_ms"]
    assert total(latency, "ray_serve_deployment_processing_latency_ms_count") == 23
    assert total(latency, "ray_serve_deployment_processing_latency_ms_sum") > 0
    replicas = {
        labels["replica"] for _, labels, _ in families["ray_serve_deployment_request_counter"]
    }
    assert len(replicas) == 2
    states = families["serve_deployment_replicas"]
    assert (
        "serve_deployment_replicas",
        {"deployment": "Counted", "application": "metered", "state": "RUNNING"},
        2.0,
    ) in states
    assert (
        total(
            families["ray_serve_deployment_replica_healthy"], "ray_serve_deployment_replica_healthy"
        )
        == 2
    )
    assert (
        total(families["ray_serve_num_router_requests"], "ray_serve_num_router_requests_total")
        == 23
    )
    assert "ray_serve_deployment_queued_queries" in families
    assert (
        total(
            families["ray_serve_controller_num_control_loops"],
            "ray_serve_controller_num_control_loops_total",
        )
        > 0
    )
    assert "ray_serve_controller_control_loop_duration_s" in families
    assert (
        "serve_application_status",
        {"application": "metered", "status": "RUNNING"},
        1.0,
    ) in families["serve_application_status"]


def _get(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.parametrize("no_auth", [False, True], ids=["token", "opted-out"])
def test_metrics_beyond_loopback_need_the_cluster_token(tmp_path: Path, no_auth: bool) -> None:
    extra = ("--metrics-no-auth",) if no_auth else ()
    c = StandaloneController(
        tmp_path / "state", "--metrics-port", "0", "--metrics-host", "0.0.0.0", *extra
    )
    try:
        c.start()
        port = c.ready["metrics"].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}/metrics"  # bound on every interface; scraped locally
        token = (tmp_path / "state" / "token").read_text().strip()
        assert _get(url, token) == 200
        assert _get(url) == (200 if no_auth else 401)
        assert _get(url, "wrong") == (200 if no_auth else 401)
    finally:
        c.cleanup()
