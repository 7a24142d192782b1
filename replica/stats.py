"""The user's replica-side stats hooks: ``record_routing_stats()`` for request routers and
``record_autoscaling_stats()`` for custom autoscaling policies (Ray's names).

Routing stats go to the controller every ``request_routing_stats_period_s`` (when they change)
and reach every router with the replica set, so no request waits on them. Autoscaling stats
ride on the replica's periodic load report. A hook that raises, hangs past its timeout or
returns something unusable is logged and skipped; the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from replica.executor import Executor
from serve._settings import settings
from serve.config import RequestRouterConfig

logger = logging.getLogger(__name__)

ROUTING_STATS = "record_routing_stats"
AUTOSCALING_STATS = "record_autoscaling_stats"
AUTOSCALING_STATS_TIMEOUT_S = 10.0


async def autoscaling_stats(executor: Executor, timeout_s: float) -> dict[str, float]:
    """What ``record_autoscaling_stats()`` returns now (empty without the hook, or on error)."""
    if not executor.initialized or not executor.has_hook(AUTOSCALING_STATS):
        return {}
    try:
        stats = await executor.call_hook(
            AUTOSCALING_STATS, min(timeout_s, AUTOSCALING_STATS_TIMEOUT_S)
        )
    except TimeoutError:
        logger.error("record_autoscaling_stats() did not return within %.1fs; skipped", timeout_s)
        return {}
    except Exception:
        logger.exception("record_autoscaling_stats() raised; skipped")
        return {}
    if not isinstance(stats, dict) or not all(
        isinstance(k, str)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        for k, v in stats.items()
    ):
        logger.error(
            "record_autoscaling_stats() must return a dict of metric name -> number, got %r; "
            "skipped",
            stats,
        )
        return {}
    return {k: float(v) for k, v in stats.items()}


async def routing_stats_loop(
    executor: Executor, report: Callable[[bytes], Awaitable[None]]
) -> None:
    """Report ``record_routing_stats()`` every period while the replica lives."""
    last: bytes | None = None
    while True:
        config = executor.config.request_router_config or RequestRouterConfig()
        await asyncio.sleep(config.request_routing_stats_period_s if executor.initialized else 0.1)
        if not executor.initialized or not executor.has_hook(ROUTING_STATS):
            continue
        encoded = await _routing_stats(executor, config.request_routing_stats_timeout_s)
        if encoded is None or encoded == last:
            continue
        try:
            await report(encoded)
        except Exception as exc:  # no controller right now: report again next period
            logger.debug("Reporting routing stats failed: %s", exc)
            continue
        last = encoded


async def _routing_stats(executor: Executor, timeout_s: float) -> bytes | None:
    try:
        stats: Any = await executor.call_hook(ROUTING_STATS, timeout_s)
    except TimeoutError:
        logger.error(
            "record_routing_stats() did not return within request_routing_stats_timeout_s=%s; "
            "routers keep the last stats",
            timeout_s,
        )
        return None
    except Exception:
        logger.exception("record_routing_stats() raised; routers keep the last stats")
        return None
    if not isinstance(stats, dict) or not all(isinstance(k, str) for k in stats):
        logger.error("record_routing_stats() must return a dict with str keys, got %r", stats)
        return None
    try:
        encoded = orjson.dumps(stats, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        logger.error("record_routing_stats() returned values that are not JSON: %s", exc)
        return None
    limit = settings().max_routing_stats_bytes
    if len(encoded) > limit:
        logger.error(
            "record_routing_stats() returned %d bytes of JSON, over the %d-byte limit "
            "(SERVE_MAX_ROUTING_STATS_BYTES); send less (routers get it with every replica set)",
            len(encoded),
            limit,
        )
        return None
    return encoded
