"""Sync user code on worker threads: outcomes, batching of wake-ups, cancellation, generators."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator

import pytest

from replica.workers import GENERATOR_BUFFER, SyncWorkers


async def test_results_and_exceptions_come_back_to_the_loop() -> None:
    workers = SyncWorkers(asyncio.get_running_loop(), 4)

    def boom() -> None:
        raise KeyError("x")

    assert await workers.start(lambda a, b=0: a + b, (1,), {"b": 2}).future == 3
    with pytest.raises(KeyError):
        await workers.start(boom, (), {}).future
    workers.shutdown()


async def test_a_base_exception_in_user_code_reaches_the_awaiting_coroutine() -> None:
    workers = SyncWorkers(asyncio.get_running_loop(), 1)

    def exits() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        await workers.start(exits, (), {}).future
    assert await workers.start(lambda: "still serving", (), {}).future == "still serving"
    workers.shutdown()


async def test_blocking_calls_run_concurrently_up_to_the_limit() -> None:
    workers = SyncWorkers(asyncio.get_running_loop(), 3)
    barrier = threading.Barrier(3, timeout=5)
    jobs = [workers.start(barrier.wait, (), {}) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 10)
    workers.shutdown()


async def test_a_queued_job_that_is_skipped_never_runs() -> None:
    workers = SyncWorkers(asyncio.get_running_loop(), 1)
    gate = threading.Event()
    ran: list[int] = []
    blocker = workers.start(gate.wait, (5,), {})
    queued = workers.start(ran.append, (1,), {})
    assert workers.skip(queued)
    gate.set()
    await blocker.future
    assert await workers.start(lambda: "after", (), {}).future == "after"
    assert ran == []
    assert not workers.skip(blocker)  # it ran already
    workers.shutdown()


async def test_many_completions_wake_the_loop_in_batches() -> None:
    loop = asyncio.get_running_loop()
    workers = SyncWorkers(loop, 2)
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(*args: object, **kwargs: object) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return original(*args, **kwargs)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        jobs = [workers.start(lambda i=i: i, (), {}) for i in range(2000)]
        results = await asyncio.gather(*(job.future for job in jobs))
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
    assert results == list(range(2000))
    assert wakeups < 1000  # far fewer wake-ups than calls
    workers.shutdown()


async def test_a_sync_generator_streams_through_a_bounded_buffer() -> None:
    workers = SyncWorkers(asyncio.get_running_loop(), 1)
    produced = 0
    closed = threading.Event()

    def numbers() -> Generator[int, None, None]:
        nonlocal produced
        try:
            for i in range(10_000):
                produced += 1
                yield i
        finally:
            closed.set()

    stream = workers.stream(numbers())
    first = [await anext(stream) for _ in range(3)]
    assert first == [0, 1, 2]
    await asyncio.sleep(0.1)
    assert produced <= 3 + 2 * GENERATOR_BUFFER + 1  # paused, not running ahead
    await stream.aclose()  # the consumer stops: the generator is closed on its thread
    assert await asyncio.to_thread(closed.wait, 5)
    workers.shutdown()


async def test_a_sync_generator_error_comes_after_its_items() -> None:
    workers = SyncWorkers(asyncio.get_running_loop(), 1)

    def fails() -> Generator[int, None, None]:
        yield 1
        yield 2
        raise ValueError("mid-stream")

    seen: list[int] = []

    async def consume() -> None:
        async for item in workers.stream(fails()):
            seen.append(item)

    with pytest.raises(ValueError, match="mid-stream"):
        await consume()
    assert seen == [1, 2]
    workers.shutdown()
