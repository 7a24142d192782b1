"""What the dashboard reads from disk: recent traces from the default exporter's span files,
and a replica's recent log lines. Pure file reading, bounded in bytes, off the controller's loop.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

MAX_TRACES = 10
# A trace whose last span ended less than this long ago may still be being written (each
# process writes its spans in batches, every half second): shown at the next read.
SETTLE_S = 1.0
SPAN_TAIL_BYTES = 512 * 1024  # read from the end of each span file
LOG_TAIL_BYTES = 64 * 1024
MAX_LOG_LINES = 200
# The attributes a trace view shows (the rest stay in the files).
SHOWN_ATTRIBUTES = (
    "app",
    "deployment",
    "replica_id",
    "request_id",
    "call_method",
    "http.method",
    "http.route",
    "http.status_code",
    "rpc.method",
    "rpc.grpc.status_code",
)


def tail(path: Path, max_bytes: int) -> list[bytes]:
    """The whole lines among the last ``max_bytes`` of a file (none if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(size - max_bytes, 0)
            f.seek(start)
            data = f.read(max_bytes)
    except OSError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # cut in the middle
    return [line for line in lines if line.strip()]


def log_tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines (at most MAX_LOG_LINES) of a log file."""
    count = max(1, min(lines, MAX_LOG_LINES))
    return [line.decode("utf-8", "replace") for line in tail(path, LOG_TAIL_BYTES)[-count:]]


def _time_s(text: Any) -> float:
    if not isinstance(text, str):
        return 0.0
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def read_spans(spans_dir: Path) -> list[dict[str, Any]]:
    """The spans at the end of every span file (malformed lines skipped)."""
    spans = []
    try:
        files = sorted(spans_dir.glob("*_tracing.json"))
    except OSError:
        return []
    for path in files:
        for line in tail(path, SPAN_TAIL_BYTES):
            try:
                span = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(span, dict) and isinstance(span.get("context"), dict):
                spans.append(span)
    return spans


def recent_traces(
    spans: Iterable[dict[str, Any]], now_s: float, limit: int = MAX_TRACES
) -> list[dict[str, Any]]:
    """The latest traces, newest first: each its spans as offsets from the trace's start
    (``now_s``: wall clock, to leave out traces that may still be being written)."""
    traces: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        trace_id = span["context"].get("trace_id")
        if isinstance(trace_id, str):
            traces.setdefault(trace_id, []).append(span)
    out = []
    for trace_id, members in traces.items():
        starts = [_time_s(s.get("start_time")) for s in members]
        ends = [_time_s(s.get("end_time")) for s in members]
        begin = min(starts)
        ids = {s["context"].get("span_id") for s in members}
        roots = [s for s in members if s.get("parent_id") not in ids]
        root = min(roots or members, key=lambda s: _time_s(s.get("start_time")))
        rows = []
        for span, start, end in zip(members, starts, ends, strict=True):
            attributes = span.get("attributes") or {}
            status = (span.get("status") or {}).get("status_code", "UNSET")
            rows.append(
                {
                    "name": span.get("name", ""),
                    "span_id": span["context"].get("span_id"),
                    "parent_id": span.get("parent_id"),
                    "start_ms": round((start - begin) * 1000.0, 3),
                    "duration_ms": round(max(end - start, 0.0) * 1000.0, 3),
                    "status": status,
                    "error": status == "ERROR"
                    or any(e.get("name") == "exception" for e in span.get("events") or ()),
                    "attributes": {k: attributes[k] for k in SHOWN_ATTRIBUTES if k in attributes},
                }
            )
        if now_s - max(ends) < SETTLE_S:
            continue
        rows.sort(key=lambda r: r["start_ms"])
        out.append(
            {
                "trace_id": trace_id,
                "root": root.get("name", ""),
                "started_s": begin,
                "duration_ms": round((max(ends) - begin) * 1000.0, 3),
                "spans": rows,
            }
        )
    out.sort(key=lambda t: t["started_s"], reverse=True)
    return out[:limit]
