"""handle.broadcast() through real daemons."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

import serve
from serve.exceptions import DeploymentUnavailableError

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment(num_replicas=3)
class Cache:
    def __init__(self) -> None:
        self._entries: dict[str, Any] = {"a": 1}

    def pid(self) -> int:
        return os.getpid()

    def reset(self, keep: str = "") -> int:
        self._entries = {k: v for k, v in self._entries.items() if k == keep}
        return len(self._entries)

    def size(self) -> int:
        return len(self._entries)

    def fail_on(self, pid: int) -> int:
        if os.getpid() == pid:
            raise ValueError(f"replica {pid} refuses")
        return os.getpid()

    async def slow(self) -> None:
        await asyncio.sleep(10)

    async def items(self) -> Any:
        yield 1


def test_broadcast_calls_every_replica_once() -> None:
    h = serve.run(Cache.bind(), name="cache")
    pids = h.broadcast("pid").results()
    assert len(pids) == 3
    assert len(set(pids)) == 3
    assert h.broadcast("reset", keep="zzz").results() == [0, 0, 0]
    assert {h.size.remote().result() for _ in range(30)} == {0}


def test_a_replica_error_raises_or_is_returned() -> None:
    h = serve.run(Cache.bind(), name="cache-errors")
    victim = h.pid.remote().result()
    with pytest.raises(ValueError, match=f"replica {victim} refuses"):
        h.broadcast("fail_on", victim).results()
    results = h.broadcast("fail_on", victim).results(return_exceptions=True)
    assert len(results) == 3
    assert sum(isinstance(r, ValueError) for r in results) == 1


def test_timeout_covers_the_whole_collection() -> None:
    h = serve.run(Cache.options(graceful_shutdown_timeout_s=0.5).bind(), name="cache-timeout")
    with pytest.raises(TimeoutError):
        h.broadcast("slow").results(timeout_s=0.5)


def test_no_replicas_is_deployment_unavailable() -> None:
    h = serve.run(Cache.options(num_replicas=0).bind(), name="cache-empty")
    with pytest.raises(DeploymentUnavailableError, match="no running replicas"):
        h.broadcast("pid").results(timeout_s=10)


def test_broadcast_ignores_stream_and_works_inside_deployments() -> None:
    h = serve.run(Cache.bind(), name="cache-stream", route_prefix=None)
    assert len(h.options(stream=True).broadcast("pid").results()) == 3

    @serve.deployment
    class Admin:
        def __init__(self, cache: Any) -> None:
            self._cache = cache

        async def reset_all(self) -> list[int]:
            return await self._cache.broadcast("reset").results_async()

    admin = serve.run(Admin.bind(Cache.bind()), name="admin")
    assert admin.reset_all.remote().result() == [0, 0, 0]


def test_broadcast_resolves_responses_once() -> None:
    h = serve.run(Cache.bind(), name="cache-compose")
    pid = h.pid.remote()
    results = h.broadcast("fail_on", pid).results(return_exceptions=True)
    assert sum(isinstance(r, ValueError) for r in results) == 1
