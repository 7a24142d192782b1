"""TaskOwner: one TaskGroup owns a component's tasks; a failing child never ends its siblings."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serve._task_owner import TaskOwner

log = logging.getLogger("test")


async def test_a_failing_child_is_logged_and_its_siblings_keep_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = TaskOwner("test:owner", log)
    await owner.start()
    release = asyncio.Event()
    finished: list[str] = []

    async def fail() -> None:
        raise RuntimeError("boom")

    async def wait() -> None:
        await release.wait()
        finished.append("sibling")

    sibling = owner.spawn(wait(), "test:sibling")
    failing = owner.spawn(fail(), "test:fail")
    assert sibling is not None
    assert failing is not None
    await asyncio.wait([failing])
    assert not sibling.done()
    release.set()
    await asyncio.wait_for(sibling, 5)
    assert finished == ["sibling"]
    assert "Task test:fail failed" in caplog.text
    await owner.aclose()


async def test_aclose_cancels_every_child_and_waits_for_its_cleanup() -> None:
    owner = TaskOwner("test:owner", log)
    await owner.start()
    cleaned: list[int] = []
    started = asyncio.Event()

    async def child(i: int) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(i)

    tasks = [owner.spawn(child(i), f"test:child:{i}") for i in range(3)]
    await started.wait()
    await owner.aclose()
    assert sorted(cleaned) == [0, 1, 2]
    assert all(t is not None and t.cancelled() for t in tasks)
    await owner.aclose()  # idempotent


async def test_spawn_outside_the_owners_life_does_not_run_the_coroutine() -> None:
    owner = TaskOwner("test:owner", log)
    ran: list[str] = []

    async def mark() -> None:
        ran.append("ran")

    assert owner.spawn(mark(), "test:early") is None
    await owner.start()
    await owner.aclose()
    assert owner.spawn(mark(), "test:late") is None
    await asyncio.sleep(0)
    assert ran == []
