"""Logs, custom metrics and traces from a deployment, and where to find them.

Run it against a standalone controller with metrics and tracing on (the dashboard serves
``/metrics``; the default exporter writes spans beside the logs)::

    SERVE_TRACING_EXPORTER_IMPORT_PATH=serve._tracing:default_tracing_exporter \\
    SERVE_TRACING_SAMPLING_RATIO=1.0 serve start
    python examples/observability.py
    serve shutdown
"""

# --8<-- [start:deployment]
import logging

from opentelemetry import trace

import serve
from serve import metrics

logger = logging.getLogger(__name__)


@serve.deployment
class Classifier:
    def __init__(self) -> None:
        self.predictions = metrics.Counter(
            "classifier_predictions", "Predictions made, by label.", tag_keys=("label",)
        )
        self.text_length = metrics.Histogram(
            "classifier_text_length", "Characters per input.", boundaries=[10, 100, 1000]
        )
        self.tracer = trace.get_tracer(__name__)

    def __call__(self, text: str) -> str:
        # A span of your own, a child of the replica's span for this request.
        with self.tracer.start_as_current_span("classify", context=serve.get_trace_context()):
            label = "long" if len(text) > 20 else "short"
        self.predictions.inc(tags={"label": label})
        self.text_length.observe(len(text))
        logger.info("classified %d characters as %s", len(text), label)  # has the request id
        return label


# --8<-- [end:deployment]

# --8<-- [start:requests]
handle = serve.run(Classifier.bind(), name="classify", route_prefix=None)
responses = [handle.remote(text) for text in ["hi", "a much longer piece of text", "ok"]]
print([r.result() for r in responses])
request_id = responses[0].request_id  # generated, or given (X-Request-ID over HTTP)
# --8<-- [end:requests]

# --8<-- [start:metrics]
import time

import httpx

dashboard = serve.status().dashboard_url  # also printed by `serve start` and `serve status`
deadline = time.monotonic() + 60
while True:  # replicas send their counters with their load reports (SERVE_METRICS_INTERVAL_S)
    scrape = httpx.get(f"{dashboard}metrics").text
    lines = [line for line in scrape.splitlines() if line.startswith("classifier_predictions")]
    if len(lines) == 2 or time.monotonic() > deadline:
        break
    time.sleep(0.5)
for line in sorted(lines):
    print(line.split("{")[0], "label=" + line.split('label="')[1].split('"')[0], line.split()[-1])
# --8<-- [end:metrics]

# --8<-- [start:files]
import json
import os
from pathlib import Path

logs = Path(os.environ.get("SERVE_STATE_DIR", "~/.serve")).expanduser() / "logs"
log_file = next(logs.glob("replica_classify_Classifier_*.log"))
for line in log_file.read_text().splitlines():
    if f"[{request_id}]" in line:  # the user's line, and serve's access line
        print(line.split(" ", 4)[-1].replace(request_id, "<request id>"))

names: set[str] = set()
deadline = time.monotonic() + 30
while "classify" not in names and time.monotonic() < deadline:
    time.sleep(0.2)  # the exporter writes in batches
    for spans in (logs / "spans").glob("replica_classify_Classifier_*_tracing.json"):
        names |= {json.loads(line)["name"] for line in spans.read_text().splitlines()}
print("spans:", sorted(names))
# --8<-- [end:files]

serve.delete("classify")
print("observability example OK")
