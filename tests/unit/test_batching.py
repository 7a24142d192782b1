"""@serve.batch in one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import serve


class Doubler:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def double(self, values: list[int]) -> list[int]:
        self.batches.append(list(values))
        return [v * 2 for v in values]


async def test_concurrent_calls_are_grouped_and_answered_in_order() -> None:
    d = Doubler()
    results = await asyncio.gather(*(d.double(i) for i in range(10)))
    assert results == [i * 2 for i in range(10)]
    assert [len(b) for b in d.batches] == [4, 4, 2]


async def test_a_lone_call_waits_at_most_the_timeout() -> None:
    d = Doubler()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await d.double(3) == 6
    assert loop.time() - started < 0.5
    assert d.batches == [[3]]


@serve.batch(max_batch_size=3)
async def fails(values: list[int]) -> list[int]:
    raise ValueError(f"batch of {len(values)} failed")


async def test_an_error_reaches_every_caller_in_the_batch() -> None:
    outcomes = await asyncio.gather(*(fails(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, ValueError) and "batch of 3" in str(o) for o in outcomes)


@serve.batch
async def wrong_length(values: list[int]) -> list[int]:
    return values[:-1]


async def test_a_result_of_the_wrong_length_is_an_error_for_all() -> None:
    outcomes = await asyncio.gather(wrong_length(1), wrong_length(2), return_exceptions=True)
    assert all(isinstance(o, TypeError) and "as long as its input" in str(o) for o in outcomes)


class Slow:
    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    @serve.batch(max_batch_size=1, max_concurrent_batches=2)
    async def work(self, values: list[int]) -> list[int]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.02)
        self.running -= 1
        return values


async def test_max_concurrent_batches() -> None:
    s = Slow()
    assert await asyncio.gather(*(s.work(i) for i in range(6))) == list(range(6))
    assert s.peak == 2


def test_misuse_is_caught_at_decoration_time() -> None:
    with pytest.raises(TypeError, match="needs an async function"):

        @serve.batch
        def sync(values: list[int]) -> list[int]:
            return values

    with pytest.raises(TypeError, match="batched generators are not supported"):

        @serve.batch
        async def streaming(values: list[int]) -> AsyncIterator[list[int]]:
            yield values

    with pytest.raises(TypeError, match="exactly one argument"):

        @serve.batch
        async def two(a: list[int], b: list[int]) -> list[int]:
            return a

    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        serve.batch(max_batch_size=0)
    with pytest.raises(TypeError, match="batch_wait_timeout_s must be a number"):
        serve.batch(batch_wait_timeout_s="soon")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_concurrent_batches must be >= 1"):
        serve.batch(max_concurrent_batches=0)


async def test_setters_tune_a_live_batcher() -> None:
    d = Doubler()
    Doubler.double.set_max_batch_size(2)  # type: ignore[attr-defined]
    try:
        await asyncio.gather(*(d.double(i) for i in range(4)))
        assert [len(b) for b in d.batches] == [2, 2]
    finally:
        Doubler.double.set_max_batch_size(4)  # type: ignore[attr-defined]
