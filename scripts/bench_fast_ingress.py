"""Fast ingress figures for `make bench`: direct ingress behind HAProxy (SERVE_ENABLE_HA_PROXY=1)
beside the default proxy, a bare uvicorn and the same FastAPI app on uvicorn alone.

Every target is measured once per round, rounds interleaved, so a neighbour's load on the
machine touches all of them alike; a figure is the median over the rounds, and its ratio the
median of the same-round ratios (to bare uvicorn, or for a FastAPI row to the FastAPI app on
uvicorn alone). Then HAProxy's balance algorithms (leastconn, power of two choices) are
compared on two replicas whose requests take uneven time.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

import serve
from scripts.bench_ingress import (
    APP,
    FastAPINoop,
    HttpNoop,
    http_floor_server,
    http_pair,
    serve_session,
    wrk,
)
from tests.support.ingress import MODE_ENV, haproxy_serves
from tests.support.procs import proxy_details, wait_for

BALANCES = ("leastconn", "random(2)")
# (key, label, what its ratio is to)
TARGETS = (
    ("floor", "bare uvicorn, raw ASGI", ""),
    ("fastapi_alone", "FastAPI app on uvicorn alone", "floor"),
    ("proxy_noop", "default proxy, noop", "floor"),
    ("proxy_fastapi", "default proxy, @serve.ingress(FastAPI)", "fastapi_alone"),
    ("haproxy_noop", "HAProxy + direct ingress, noop", "floor"),
    ("haproxy_fastapi", "HAProxy + direct ingress, @serve.ingress(FastAPI)", "fastapi_alone"),
)
TARGET_RPS = {
    "proxy_noop": ">= 0.35",
    "proxy_fastapi": ">= 0.5",
    "haproxy_noop": ">= 0.5",
    "haproxy_fastapi": ">= 0.8",
}


@serve.deployment(num_replicas=2, max_ongoing_requests=1000)
class Uneven:
    """One request in 20 takes 20 ms, the rest 1 ms: a replica stuck on slow ones should get
    fewer new requests."""

    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(0.02 if random.random() < 0.05 else 0.001)
        return "ok"


def _url(haproxy: bool) -> str:
    if haproxy:  # sent to the replicas, not to the proxy behind HAProxy
        wait_for(lambda: haproxy_serves(APP), timeout_s=30, interval_s=0.05)
    return f"http://{proxy_details().http_address}/"


def _serve_pair(mode: str, seconds: float) -> dict[str, dict[str, Any]]:
    out = {}
    with serve_session(MODE_ENV[mode]):
        for name, deployment in (("noop", HttpNoop), ("fastapi", FastAPINoop)):
            serve.run(deployment.bind(), name=APP, route_prefix="/")
            out[f"{mode}_{name}"] = http_pair(_url(mode == "haproxy"), seconds)
            serve.delete(APP)
    return out


PeersRound = Callable[[float], dict[str, dict[str, Any]]]


def measure_fast_ingress(
    seconds: float, rounds: int, peers: PeersRound | None = None
) -> dict[str, Any]:
    """Per target, each round's figures (``c64`` req/s, ``c1`` p50) and their medians.
    ``peers`` (scripts/bench_peers.py) measures other frameworks once per round, after ours:
    its rounds are in ``peer_runs``, the time they took in ``peers_s``."""
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in TARGETS}
    peer_runs: list[dict[str, dict[str, Any]]] = []
    peers_s = 0.0
    for _ in range(rounds):
        with http_floor_server() as url:
            runs["floor"].append(http_pair(url, seconds))
        with http_floor_server("fastapi") as url:
            runs["fastapi_alone"].append(http_pair(url, seconds))
        for mode in ("proxy", "haproxy"):
            for key, figures in _serve_pair(mode, seconds).items():
                runs[key].append(figures)
        if peers is not None:
            started = time.monotonic()
            peer_runs.append(peers(seconds))
            peers_s += time.monotonic() - started
    summary: dict[str, Any] = {}
    for key, _, versus in TARGETS:
        rps = [r["c64"]["rps"] for r in runs[key]]
        p50 = [r["c1"]["p50_us"] for r in runs[key]]
        summary[key] = {
            "rps_64": statistics.median(rps),
            "p50_us_1": statistics.median(p50),
            "rps_ratio": _median_ratio(rps, [r["c64"]["rps"] for r in runs[versus]])
            if versus
            else None,
            "p50_over_floor_us": statistics.median(
                p - f["c1"]["p50_us"] for p, f in zip(p50, runs["floor"], strict=True)
            ),
            "errors": sum(r["c64"]["errors"] + r["c1"]["errors"] for r in runs[key]),
        }
    return {
        "rounds": rounds,
        "runs": runs,
        "summary": summary,
        "balance": _balances(seconds),
        "peer_runs": peer_runs,
        "peers_s": peers_s,
    }


def _median_ratio(values: list[float], floors: list[float]) -> float:
    return statistics.median(v / f for v, f in zip(values, floors, strict=True))


def _balances(seconds: float) -> dict[str, dict[str, Any]]:
    """Each balance algorithm on two replicas with uneven requests, 64 connections."""
    out = {}
    for balance in BALANCES:
        env = {**MODE_ENV["haproxy"], "SERVE_HAPROXY_BALANCE_ALGORITHM": balance}
        with serve_session(env):
            serve.run(Uneven.bind(), name=APP, route_prefix="/")
            url = _url(haproxy=True)
            wrk(url, 64, 1)
            out[balance] = wrk(url, 64, seconds)
    return out


def ratio_row(
    name: str, value: float, unit: str, ratio: float | None, target: str = ""
) -> dict[str, Any]:
    """A bench table row given its ratio (a median of same-round ratios, so the floor shown
    is the one that ratio implies)."""
    floor = value / ratio if ratio else None
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "floor": floor,
        "ratio": ratio,
        "target": target,
    }


def fast_ingress_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The bench table's rows: each target's req/s at 64 connections beside its same-round
    ratio (to bare uvicorn, or for FastAPI to the app on uvicorn alone), and its p50 at one
    connection beside bare uvicorn's."""
    rows: list[dict[str, Any]] = []

    def row(name: str, value: float, unit: str, ratio: float | None, target: str) -> None:
        rows.append(ratio_row(name, value, unit, ratio, target))

    summary = result["summary"]
    floor_p50 = summary["floor"]["p50_us_1"]
    rounds = result["rounds"]
    for key, label, _ in TARGETS:
        figures = summary[key]
        target = TARGET_RPS.get(key, "")
        row(
            f"{label}, 64 conn ({rounds} rounds)",
            figures["rps_64"],
            "req/s",
            figures["rps_ratio"],
            target,
        )
        p50_target = f"<= {floor_p50 + 150:,.0f} us" if key == "haproxy_noop" else ""
        p50 = figures["p50_us_1"]
        row(f"{label} p50, 1 conn", p50, "us", p50 / floor_p50, p50_target)
    for balance, figures in result["balance"].items():
        row(f"HAProxy {balance}, 2 uneven replicas, 64 conn", figures["rps"], "req/s", None, "")
        row(f"HAProxy {balance}, 2 uneven replicas, p99", figures["p99_us"] or 0.0, "us", None, "")
    return rows
