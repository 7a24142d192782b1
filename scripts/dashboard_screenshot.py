"""The docs' dashboard picture (docs/dashboard.png), and what the dashboard costs the controller.

Starts a standalone controller (its own state directory, a proxy on a free port, tracing at a
ratio of 0.2), deploys Ingress -> Preprocess -> Model (Model autoscaled), and sends HTTP load
from 8 threads for a bounded time. Measures the controller's CPU over the same length of time
with no page open, then with the dashboard open in Debian's headless Chromium, then opens a
replica's log and a trace and saves ``docs/dashboard.png``. Everything it starts is stopped.

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.browser import headless_chromium, save_screenshot  # noqa: E402
from tests.support.procs import StandaloneController, run_script, wait_for  # noqa: E402

DEPLOY = textwrap.dedent(
    """
    import asyncio, random
    import serve
    from serve.handle import DeploymentHandle

    @serve.deployment(
        autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                            "upscale_delay_s": 3, "downscale_delay_s": 600,
                            "metrics_interval_s": 1, "look_back_period_s": 5})
    class Model:
        async def predict(self, x):
            await asyncio.sleep(random.uniform(0.005, 0.03))
            if x % 97 == 0:
                raise ValueError("a bad input")
            return x * 2

    @serve.deployment
    class Preprocess:
        async def __call__(self, x):
            return x + 1

    @serve.deployment
    class Ingress:
        def __init__(self, pre: DeploymentHandle, model: DeploymentHandle):
            self.pre, self.model = pre, model

        async def __call__(self, request):
            x = int(request.query_params.get("x", "1"))
            try:
                return str(await self.model.predict.remote(await self.pre.remote(x)))
            except ValueError:
                return "rejected"

    serve.run(Ingress.bind(Preprocess.bind(), Model.bind()), name="shop", route_prefix="/")
    print(list(serve.status().proxy_details.values())[0].http_address)
    """
)
PHASE_S = 30.0
THREADS = 8


def load(http: str, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            with urllib.request.urlopen(f"http://{http}/?x={i}", timeout=10) as response:
                response.read()
        except OSError:
            time.sleep(0.1)


def controller_cpu_s(pid: int, seconds: float) -> float:
    process = psutil.Process(pid)
    before = process.cpu_times()
    time.sleep(seconds)
    after = process.cpu_times()
    return (after.user + after.system) - (before.user + before.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="serve-dashboard-demo-")) / "state"
    controller = StandaloneController(
        state,
        "--metrics-port",
        "0",
        "--proxy-location",
        "EveryNode",
        "--http-port",
        "0",
        SERVE_METRICS_INTERVAL_S="1",
        SERVE_LOG_LEVEL="INFO",
        SERVE_TRACING_EXPORTER_IMPORT_PATH="serve._tracing:default_tracing_exporter",
        SERVE_TRACING_SAMPLING_RATIO="0.2",
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        controller.start()
        assert controller.process is not None
        result = run_script(DEPLOY, timeout_s=120, **controller.driver_env())
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        http = result.stdout.split()[-1]
        threads = [threading.Thread(target=load, args=(http, stop)) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        time.sleep(5.0)
        closed = controller_cpu_s(controller.process.pid, PHASE_S)
        with headless_chromium(1400, 1600) as driver:
            driver.get(controller.ready["dashboard"])
            opened = controller_cpu_s(controller.process.pid, PHASE_S)
            with urllib.request.urlopen(controller.ready["dashboard"] + "api/state") as r:
                state_bytes = len(r.read())
            wait_for(
                lambda: driver.find_elements("css selector", "#replicas tr[data-replica-id]"),
                timeout_s=10,
            )
            driver.find_element("css selector", "#replicas tr[data-replica-id] button").click()
            wait_for(lambda: driver.find_elements("css selector", "#traces tr[data-trace-id]"))
            driver.find_element("css selector", "#traces tr[data-trace-id]").click()
            time.sleep(2.5)
            save_screenshot(driver, "", Path(args.out))
        print(f"controller CPU over {PHASE_S:.0f} s under load: {closed:.2f} s with no page open")
        print(f"controller CPU over {PHASE_S:.0f} s under load: {opened:.2f} s with the page open")
        print(f"/api/state: {state_bytes} bytes; screenshot: {args.out}")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
        controller.cleanup()


if __name__ == "__main__":
    main()
