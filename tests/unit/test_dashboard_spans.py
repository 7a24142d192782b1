"""What the dashboard reads from span files and logs: bounded tails, traces grouped and
ordered, traces still being written held back."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from controller.spans import log_tail, read_spans, recent_traces, tail


def span(
    trace: str, span_id: str, parent: str | None, start: str, end: str, name: str
) -> dict[str, Any]:
    return {
        "name": name,
        "context": {"trace_id": trace, "span_id": span_id},
        "parent_id": parent,
        "start_time": f"2026-12-06T06:00:{start}Z",
        "end_time": f"2026-12-06T06:00:{end}Z",
        "status": {"status_code": "UNSET"},
        "attributes": {"deployment": "Model", "secret": "not shown"},
        "events": [{"name": "exception"}] if name == "failed" else [],
    }


def test_tails_are_whole_lines_within_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    lines = tail(path, 100)
    assert sum(len(x) + 1 for x in lines) <= 100
    assert lines[-1] == b"line 999"
    assert all(x.startswith(b"line ") for x in lines)  # the cut line is dropped
    assert log_tail(path, 3) == ["line 997", "line 998", "line 999"]
    assert len(log_tail(path, 10_000)) == 200  # at most MAX_LOG_LINES
    assert tail(tmp_path / "missing.log", 100) == []


def test_traces_are_grouped_newest_first_and_unsettled_ones_wait(tmp_path: Path) -> None:
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    old = [
        span("0xa", "0x1", None, "01.000", "01.050", "proxy_http_request"),
        span("0xa", "0x2", "0x1", "01.010", "01.040", "failed"),
    ]
    newer = [span("0xb", "0x3", "0xclient", "02.000", "02.020", "proxy_http_request")]
    writing = [span("0xc", "0x4", None, "03.400", "03.500", "proxy_http_request")]
    (spans_dir / "proxy_1_tracing.json").write_text(
        "\n".join(json.dumps(s) for s in [old[0], *newer, *writing]) + "\n{not json\n"
    )
    (spans_dir / "replica_x_tracing.json").write_text(json.dumps(old[1]) + "\n")
    now = datetime.datetime.fromisoformat("2026-12-06T06:00:04+00:00").timestamp()
    traces = recent_traces(read_spans(spans_dir), now)
    assert [t["trace_id"] for t in traces] == ["0xb", "0xa"]  # 0xc ended < 1 s ago
    assert recent_traces(read_spans(spans_dir), now + 1)[0]["trace_id"] == "0xc"
    first = traces[1]
    assert first["root"] == "proxy_http_request"
    assert first["duration_ms"] == 50.0
    assert [(s["name"], s["start_ms"], s["duration_ms"]) for s in first["spans"]] == [
        ("proxy_http_request", 0.0, 50.0),
        ("failed", 10.0, 30.0),
    ]
    assert first["spans"][1]["error"] is True
    assert first["spans"][0]["attributes"] == {"deployment": "Model"}
    assert traces[0]["root"] == "proxy_http_request"  # its parent is the client's span
