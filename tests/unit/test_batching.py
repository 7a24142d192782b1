"""@serve.batch in one process: Ray's batching unit tests, ported, plus this project's own.

Ray's tests wait a fixed 0.01-0.1 s to see that a batch has *not* run; here the loop runs until
nothing more can happen (``_settle``) instead, and every wait for an outcome is bounded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import cloudpickle
import numpy as np
import pytest

import serve
from replica.executor import _kind
from serve._context import RequestContext, reset_current_request, set_current_request
from serve.exceptions import RayServeException

BOUND_S = 10  # generous: a bound on a wait, never a measured time


async def _settle() -> None:
    """Let every ready task run until the loop has nothing left to do right now."""
    for _ in range(50):
        await asyncio.sleep(0)


async def _all(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    async with asyncio.timeout(BOUND_S):
        return await asyncio.gather(*tasks)


def _task(awaitable: Awaitable[Any]) -> asyncio.Task[Any]:
    async def wrapped() -> Any:
        return await awaitable

    return asyncio.get_running_loop().create_task(wrapped())


# Ray: test_decorator_validation


async def test_decorator_validation() -> None:
    @serve.batch
    async def function() -> list[None]:
        return []

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=1.5)
    async def function2() -> list[None]:
        return []

    class Class:
        @serve.batch
        async def method(self) -> list[None]:
            return []

    with pytest.raises(TypeError, match="async def"):

        @serve.batch
        def non_async_function(requests: list[int]) -> list[int]:
            return requests

    with pytest.raises(TypeError, match="async def"):

        class NotAsync:
            @serve.batch(max_batch_size=2)
            def method(self, requests: list[int]) -> list[int]:
                return requests

    with pytest.raises(ValueError, match="max_batch_size must be an integer >= 1"):
        serve.batch(max_batch_size=0)
    with pytest.raises(TypeError, match="max_batch_size must be an integer >= 1"):
        serve.batch(max_batch_size=1.1)  # type: ignore[arg-type]
    serve.batch(max_batch_size=1.0)  # type: ignore[arg-type]  # an integral float is fine
    with pytest.raises(ValueError, match="batch_wait_timeout_s must be"):
        serve.batch(batch_wait_timeout_s=-0.1)
    serve.batch(batch_wait_timeout_s=0.0)
    serve.batch(batch_wait_timeout_s=0)
    with pytest.raises(TypeError, match="batch_wait_timeout_s must be"):
        serve.batch(batch_wait_timeout_s="a")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_concurrent_batches must be an integer >= 1"):
        serve.batch(max_concurrent_batches=0)
    with pytest.raises(TypeError, match="batch_size_fn must be a callable or None"):
        serve.batch(batch_size_fn="not_a_function")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="can only decorate functions or methods"):
        serve.batch(5)  # type: ignore[arg-type]


# Ray: test_batch_size_one_long_timeout, test_batch_size_multiple_long_timeout,
# test_batch_size_multiple_zero_timeout (use_class / function)


def _caller(
    use_class: bool, max_batch_size: int, timeout_s: float, gate: asyncio.Event | None = None
) -> Callable[[str], Awaitable[str]]:
    async def body(requests: list[str]) -> list[str]:
        if gate is not None:
            await gate.wait()
        if "raise" in requests:
            _ = 1 / 0
        return requests

    @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=timeout_s)
    async def function(requests: list[str]) -> list[str]:
        return await body(requests)

    class Class:
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=timeout_s)
        async def method(self, requests: list[str]) -> list[str]:
            return await body(requests)

    return Class().method if use_class else function


@pytest.mark.parametrize("use_class", [True, False])
async def test_batch_size_one_long_timeout(use_class: bool) -> None:
    call = _caller(use_class, max_batch_size=1, timeout_s=1000)
    assert await call("hi") == "hi"
    with pytest.raises(ZeroDivisionError):
        await call("raise")


@pytest.mark.parametrize("use_class", [True, False])
async def test_batch_size_multiple_zero_timeout(use_class: bool) -> None:
    gate = asyncio.Event()
    call = _caller(use_class, max_batch_size=2, timeout_s=0, gate=gate)
    gate.set()
    assert await call("hi") == "hi"
    with pytest.raises(ZeroDivisionError):
        await call("raise")
    gate.clear()
    # The first call runs alone at once; the next two, queued behind it, run together.
    t1 = _task(call("hi1"))
    await _settle()
    assert not t1.done()
    t2, t3 = _task(call("hi2")), _task(call("raise"))
    gate.set()
    assert await asyncio.wait_for(t1, BOUND_S) == "hi1"
    for t in (t2, t3):
        with pytest.raises(ZeroDivisionError):
            await asyncio.wait_for(t, BOUND_S)


@pytest.mark.parametrize("use_class", [True, False])
async def test_batch_size_multiple_long_timeout(use_class: bool) -> None:
    call = _caller(use_class, max_batch_size=3, timeout_s=1000)
    t1, t2 = _task(call("hi1")), _task(call("hi2"))
    await _settle()
    assert not t1.done()
    assert not t2.done()
    t3 = _task(call("hi3"))
    assert await _all([t1, t2, t3]) == ["hi1", "hi2", "hi3"]

    t1, t2 = _task(call("hi1")), _task(call("raise"))
    await _settle()
    assert not t1.done()
    assert not t2.done()
    t3 = _task(call("hi3"))
    outcomes = await asyncio.wait_for(asyncio.gather(t1, t2, t3, return_exceptions=True), BOUND_S)
    assert all(isinstance(o, ZeroDivisionError) for o in outcomes)


# Ray: test_batch_timeout_empty_queue (adapted: no wall-clock windows)


async def test_a_batch_waits_for_its_timeout_or_a_full_batch() -> None:
    @serve.batch(max_batch_size=10, batch_wait_timeout_s=1000)
    async def no_op(requests: list[None]) -> list[str]:
        return ["No-op"] * len(requests)

    for _ in range(2):
        tasks = [_task(no_op(None)) for _ in range(9)]
        await _settle()
        assert not any(t.done() for t in tasks)
        tasks.append(_task(no_op(None)))
        assert await _all(tasks) == ["No-op"] * 10


# Ray: test_batch_wait_queue_exceeds_batch_size_race_condition


async def test_a_queue_longer_than_a_batch_is_served_in_full_batches() -> None:
    sizes: list[int] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=10000)
    async def no_op(requests: list[None]) -> list[str]:
        sizes.append(len(requests))
        return ["No-op"] * len(requests)

    assert await _all([_task(no_op(None)) for _ in range(10)]) == ["No-op"] * 10
    assert sizes == [2] * 5


# Ray: test_batch_args_kwargs (mode x use_class)


def _pairing(use_class: bool) -> Any:  # a batched function, with its setters
    if use_class:

        class MultipleArgs:
            @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
            async def method(self, key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
                return [(key1[i], key2[i]) for i in range(len(key1))]

        return MultipleArgs().method

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        return [(key1[i], key2[i]) for i in range(len(key1))]

    return func


def _two_calls(func: Callable[..., Any], mode: str) -> list[Any]:
    if mode == "args":
        return [func("hi1", "hi2"), func("hi3", "hi4")]
    if mode == "kwargs":
        return [func(key1="hi1", key2="hi2"), func(key1="hi3", key2="hi4")]
    if mode == "mixed":
        return [func("hi1", key2="hi2"), func("hi3", key2="hi4")]
    return [func(key2="hi2", key1="hi1"), func(key2="hi4", key1="hi3")]


MODES = ["args", "kwargs", "mixed", "out-of-order"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_class", [True, False])
async def test_batch_args_kwargs(mode: str, use_class: bool) -> None:
    result = await _all([_task(c) for c in _two_calls(_pairing(use_class), mode)])
    assert result == [("hi1", "hi2"), ("hi3", "hi4")]


async def test_defaults_and_keyword_only_arguments() -> None:
    seen: list[tuple[Any, ...]] = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000)
    async def f(a: list[int], b: Any = 0, *, c: Any = "c") -> list[int]:
        seen.append((a, b, c))
        return a

    await _all([_task(f(1)), _task(f(2)), _task(f(3))])
    assert seen == [([1, 2, 3], 0, "c")]  # passed by nobody: the default, not a list
    await _all([_task(f(1, 5)), _task(f(2)), _task(f(3, c="x"))])
    assert seen[-1] == ([1, 2, 3], [5, 0, 0], ["c", "c", "x"])  # passed by some: one per call
    with pytest.raises(TypeError, match="missing a required argument"):
        await f()


# Ray: test_batch_cancellation, test_cancellation_after_error (use_class x use_gen)


def _gated(use_class: bool, use_gen: bool, implementation: Any) -> Callable[..., Any]:
    class MultipleArgs:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def unary_method(self, key1: list[str], key2: list[str]) -> Any:
            return await implementation.unary(key1, key2)

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def streaming_method(self, key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
            async for value in implementation.streaming(key1, key2):
                yield value

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def unary_func(key1: list[str], key2: list[str]) -> Any:
        return await implementation.unary(key1, key2)

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def streaming_func(key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
        async for value in implementation.streaming(key1, key2):
            yield value

    if use_class:
        instance = MultipleArgs()
        return instance.streaming_method if use_gen else instance.unary_method
    return streaming_func if use_gen else unary_func


def _first_results(func: Callable[..., Any], use_gen: bool) -> list[asyncio.Task[Any]]:
    if use_gen:
        gens = [func("hi1", "hi2"), func("hi3", "hi4")]
        return [_task(gen.__anext__()) for gen in gens]
    return [_task(func("hi1", "hi2")), _task(func("hi3", "hi4"))]


@pytest.mark.parametrize("use_class", [True, False])
@pytest.mark.parametrize("use_gen", [True, False])
async def test_batch_cancellation(use_class: bool, use_gen: bool) -> None:
    @dataclasses.dataclass
    class Blocking:
        gate: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
        was_cancelled: bool = True

        async def unary(self, key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
            await self.gate.wait()
            self.was_cancelled = False
            return list(zip(key1, key2, strict=True))

        async def streaming(self, key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
            yield await self.unary(key1, key2)

    impl = Blocking()
    func = _gated(use_class, use_gen, impl)
    tasks = _first_results(func, use_gen)
    await _settle()
    assert not any(t.done() for t in tasks)
    tasks[0].cancel()
    await _settle()
    assert tasks[0].cancelled()
    assert not tasks[1].done()
    tasks[1].cancel()
    await _settle()
    assert all(t.cancelled() for t in tasks)
    assert impl.was_cancelled

    impl.gate.set()
    assert await _all(_first_results(func, use_gen)) == [("hi1", "hi2"), ("hi3", "hi4")]


@pytest.mark.parametrize("use_class", [True, False])
@pytest.mark.parametrize("use_gen", [True, False])
async def test_cancellation_after_error(use_class: bool, use_gen: bool) -> None:
    @dataclasses.dataclass
    class FailsUntilFixed:
        fixed: bool = False

        async def unary(self, key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
            if not self.fixed:
                raise ValueError("not yet")
            return list(zip(key1, key2, strict=True))

        async def streaming(self, key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
            yield await self.unary(key1, key2)

    impl = FailsUntilFixed()
    func = _gated(use_class, use_gen, impl)
    tasks = _first_results(func, use_gen)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), BOUND_S)
    for task in tasks:
        task.cancel()  # cancelling a request that already failed is fine
    impl.fixed = True
    assert await _all(_first_results(func, use_gen)) == [("hi1", "hi2"), ("hi3", "hi4")]


# Ray: test_batch_setters, test_batch_use_earliest_setters, test_batch_generator_setters


@pytest.mark.parametrize("use_class", [True, False])
async def test_batch_setters(use_class: bool) -> None:
    func = _pairing(use_class)
    assert func._get_max_batch_size() == 2
    assert func._get_batch_wait_timeout_s() == 1000
    assert set(await _all([_task(func("hi1", "hi2")), _task(func("hi3", "hi4"))])) == {
        ("hi1", "hi2"),
        ("hi3", "hi4"),
    }
    func.set_max_batch_size(3)
    func.set_batch_wait_timeout_s(15000)
    assert func._get_max_batch_size() == 3
    assert func._get_batch_wait_timeout_s() == 15000
    tasks = [_task(func("hi1", "hi2")), _task(func("hi3", "hi4"))]
    await _settle()
    assert not any(t.done() for t in tasks)  # a batch of 3 now
    tasks.append(_task(func("hi5", "hi6")))
    assert len(await _all(tasks)) == 3
    with pytest.raises(ValueError, match="max_batch_size"):
        func.set_max_batch_size(0)


async def test_batch_use_earliest_setters() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        return list(zip(key1, key2, strict=True))

    func.set_max_batch_size(3)
    func.set_batch_wait_timeout_s(15000)
    tasks = [_task(func("hi1", "hi2")), _task(func("hi3", "hi4"))]
    await _settle()
    assert not any(t.done() for t in tasks)
    # A batch that has started gathering keeps its settings ...
    func.set_max_batch_size(1)
    func.set_batch_wait_timeout_s(0)
    assert func._get_max_batch_size() == 1
    assert func._get_batch_wait_timeout_s() == 0
    await _settle()
    assert not any(t.done() for t in tasks)
    tasks.append(_task(func("hi5", "hi6")))
    assert len(await _all(tasks)) == 3
    # ... and the next one uses the new ones.
    assert await asyncio.wait_for(func("hi1", "hi2"), BOUND_S) == ("hi1", "hi2")


async def test_batch_generator_setters() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def yield_three_times(key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
        for _ in range(3):
            yield list(zip(key1, key2, strict=True))

    args_list = [("hi1", "hi2"), ("hi3", "hi4")]
    gens = [yield_three_times(*args) for args in args_list]
    for gen, expected in zip(gens, args_list, strict=True):
        for _ in range(2):
            assert await asyncio.wait_for(gen.__anext__(), BOUND_S) == expected
    yield_three_times.set_max_batch_size(3)
    yield_three_times.set_batch_wait_timeout_s(15000)
    args_list_2 = [("hi1", "hi2"), ("hi3", "hi4"), ("hi5", "hi6")]
    gens_2 = [yield_three_times(*args) for args in args_list_2]
    for gen, expected in zip(gens, args_list, strict=True):
        assert await asyncio.wait_for(gen.__anext__(), BOUND_S) == expected
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
    for gen, expected in zip(gens_2, args_list_2, strict=True):
        assert [item async for item in gen] == [expected] * 3


# Ray: test_batch_generator_basic, test_batch_generator_exceptions,
# test_batch_generator_early_termination


def _yielding(use_class: bool, length: int) -> Callable[..., Any]:
    if use_class:

        class MultipleArgs:
            @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
            async def method(self, key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
                for i in range(length):
                    yield [(i, key1[j], key2[j]) for j in range(len(key1))]

        return MultipleArgs().method

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
        for i in range(length):
            yield [(i, key1[j], key2[j]) for j in range(len(key1))]

    return func


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_class", [True, False])
@pytest.mark.parametrize("generator_length", [0, 2, 5])
async def test_batch_generator_basic(mode: str, use_class: bool, generator_length: int) -> None:
    generators = _two_calls(_yielding(use_class, generator_length), mode)

    async def drain(gen: Any) -> list[Any]:
        return [item async for item in gen]

    # The first stream is read to its end before the second is touched: both calls were
    # queued when made, so they still share one batch.
    async with asyncio.timeout(BOUND_S):
        results = [await drain(generators[0]), await drain(generators[1])]
    assert results == [
        [(i, "hi1", "hi2") for i in range(generator_length)],
        [(i, "hi3", "hi4") for i in range(generator_length)],
    ]


@pytest.mark.parametrize("error_type", ["runtime_error", "mismatched_lengths"])
async def test_batch_generator_exceptions(error_type: str) -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(key1: list[str], key2: list[str]) -> AsyncIterator[Any]:
        for i in range(5):
            results = [(i, key1[j], key2[j]) for j in range(len(key1))]
            if i == 2:
                if error_type == "runtime_error":
                    raise RuntimeError("Testing error")
                yield results * 2
            yield results

    for gen in [func("hi1", "hi2"), func("hi3", "hi4")]:
        async with asyncio.timeout(BOUND_S):
            for _ in range(2):
                await gen.__anext__()
            if error_type == "runtime_error":
                with pytest.raises(RuntimeError, match="Testing error"):
                    await gen.__anext__()
            else:
                with pytest.raises(RayServeException, match="preserve the batch size"):
                    await gen.__anext__()
            with pytest.raises(StopAsyncIteration):
                await gen.__anext__()


@pytest.mark.parametrize("stop_token", [StopAsyncIteration, StopIteration])
async def test_batch_generator_early_termination(stop_token: type[Exception]) -> None:
    callers = 4
    event = asyncio.Event()

    @serve.batch(max_batch_size=callers, batch_wait_timeout_s=1000)
    async def sequential_terminator(ids: list[int]) -> AsyncIterator[list[Any]]:
        """Ends the callers' streams one after another, in call order."""
        for finished in range(1, callers + 1):
            event.clear()
            yield [stop_token] * finished + ids[finished:]
            await event.wait()

    generators = [sequential_terminator(i) for i in range(callers)]
    async with asyncio.timeout(BOUND_S):
        for i, gen in enumerate(generators):
            async for result in gen:
                assert result == i
            event.set()  # each ended stream lets the batch take its next step


# Ray: test_batch_size_fn_deferred_item_early_break, test_batch_size_fn_fail_to_fit,
# test_batch_size_fn_multiple_items_fit


def _sized(max_batch_size: int, batches: list[list[str]]) -> Callable[..., Any]:
    @serve.batch(
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=0.05,
        batch_size_fn=lambda items: sum(item["size"] for item in items),
    )
    async def handler(requests: list[dict[str, Any]]) -> list[str]:
        batches.append([r["value"] for r in requests])
        return [r["value"] for r in requests]

    return handler


async def test_batch_size_fn_deferred_item_early_break() -> None:
    batches: list[list[str]] = []
    handler = _sized(10, batches)
    tasks = [
        _task(handler({"size": 6, "value": "first"})),
        _task(handler({"size": 6, "value": "second"})),
    ]
    assert await _all(tasks) == ["first", "second"]
    assert batches == [["first"], ["second"]]


async def test_batch_size_fn_fail_to_fit() -> None:
    handler = _sized(10, [])
    t1 = _task(handler({"size": 6, "value": "first"}))
    t2 = _task(handler({"size": 12, "value": "second"}))
    assert await asyncio.wait_for(t1, BOUND_S) == "first"
    with pytest.raises(RuntimeError, match="more than max_batch_size=10"):
        await asyncio.wait_for(t2, BOUND_S)


async def test_batch_size_fn_multiple_items_fit() -> None:
    batches: list[list[str]] = []
    handler = _sized(20, batches)
    sizes = {"a": 5, "b": 6, "c": 7}  # 18 <= 20: one batch
    await _all([_task(handler({"size": s, "value": v})) for v, s in sizes.items()])
    assert batches == [["a", "b", "c"]]


async def test_batch_size_fn_full_batch_runs_without_waiting() -> None:
    batches: list[list[str]] = []

    @serve.batch(
        max_batch_size=10, batch_wait_timeout_s=1000, batch_size_fn=lambda items: sum(items)
    )
    async def handler(sizes: list[int]) -> list[int]:
        batches.append([str(s) for s in sizes])
        return sizes

    assert await _all([_task(handler(4)), _task(handler(6))]) == [4, 6]  # exactly 10: due now


# This project's own.


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


async def test_each_instance_batches_on_its_own() -> None:
    a, b = Doubler(), Doubler()
    await asyncio.gather(a.double(1), b.double(2), a.double(3))
    assert a.batches == [[1, 3]]
    assert b.batches == [[2]]


@serve.batch(max_batch_size=3)
async def fails(values: list[int]) -> list[int]:
    raise ValueError(f"batch of {len(values)} failed")


async def test_an_error_reaches_every_caller_in_the_batch() -> None:
    outcomes = await asyncio.gather(*(fails(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, ValueError) and "batch of 3" in str(o) for o in outcomes)


@serve.batch
async def wrong_length(values: list[int]) -> list[int]:
    return values[:-1]


@serve.batch
async def not_sized(values: list[int]) -> int:
    return len(values)


async def test_results_must_be_one_per_input() -> None:
    outcomes = await asyncio.gather(wrong_length(1), wrong_length(2), return_exceptions=True)
    assert all(isinstance(o, RayServeException) for o in outcomes)
    assert "got 2 inputs and gave 1 results" in str(outcomes[0])
    with pytest.raises(TypeError, match="gave a int"):
        await not_sized(1)


@serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
async def vectorized(values: list[int]) -> Any:
    return np.array(values) * 2


async def test_any_sized_result_such_as_a_numpy_array() -> None:
    assert await asyncio.gather(*(vectorized(i) for i in range(4))) == [0, 2, 4, 6]


class Slow:
    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.release = asyncio.Event()

    @serve.batch(max_batch_size=1, max_concurrent_batches=2)
    async def work(self, values: list[int]) -> list[int]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        await self.release.wait()
        self.running -= 1
        return values


async def test_max_concurrent_batches() -> None:
    s = Slow()
    tasks = [_task(s.work(i)) for i in range(6)]
    await _settle()
    assert s.running == 2
    s.release.set()
    assert await _all(tasks) == list(range(6))
    assert s.peak == 2


class Models:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str]]] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def predict(self, inputs: list[str]) -> list[str]:
        model_id = serve.get_multiplexed_model_id()
        self.batches.append((model_id, inputs))
        return [f"{model_id}:{x}" for x in inputs]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def stream(self, inputs: list[str]) -> AsyncIterator[list[str]]:
        model_id = serve.get_multiplexed_model_id()
        for step in range(2):
            yield [f"{model_id}:{x}:{step}" for x in inputs]


def _as_request(model_id: str, call: Callable[..., Any]) -> asyncio.Task[Any]:
    """Run ``call`` as the replica would for a request for ``model_id``."""

    async def run() -> Any:
        token = set_current_request(
            RequestContext(request_id=f"r-{model_id}", multiplexed_model_id=model_id)
        )
        try:
            result = call()
            if inspect.isasyncgen(result):
                return [item async for item in result]
            return await result
        finally:
            reset_current_request(token)

    return _task(run())


async def test_requests_for_models_a_b_a_b_run_as_one_batch_per_model() -> None:
    m = Models()
    ids = ["a", "b", "a", "b"]
    tasks = [_as_request(i, lambda n=n: m.predict(f"x{n}")) for n, i in enumerate(ids)]
    assert await _all(tasks) == ["a:x0", "b:x1", "a:x2", "b:x3"]
    assert sorted(m.batches) == [("a", ["x0", "x2"]), ("b", ["x1", "x3"])]

    tasks = [_as_request(i, lambda n=n: m.stream(f"x{n}")) for n, i in enumerate(ids)]
    streams = await _all(tasks)
    assert streams[1] == ["b:x1:0", "b:x1:1"]
    assert streams[2] == ["a:x2:0", "a:x2:1"]


# Ray: test_multiplexed_batches_fill_per_model_id,
# test_multiplexed_batches_do_not_run_before_model_batch_fills,
# test_multiplexed_batch_queues_share_max_concurrent_batches, and the idle-queue cleanup tests


def _recording_batcher(records: list[tuple[str, list[str]]], **settings: Any) -> Any:
    @serve.batch(**settings)
    async def multiplexed_batch(requests: list[str]) -> list[str]:
        model_id = serve.get_multiplexed_model_id()
        records.append((model_id, list(requests)))
        return [f"{model_id}:{r}" for r in requests]

    return multiplexed_batch


async def test_multiplexed_batches_fill_per_model_id() -> None:
    records: list[tuple[str, list[str]]] = []
    batcher = _recording_batcher(records, max_batch_size=5, batch_wait_timeout_s=1000)
    tasks = []
    for i in range(5):
        tasks.append(_as_request("model-a", lambda i=i: batcher(f"a-{i}")))
        tasks.append(_as_request("model-b", lambda i=i: batcher(f"b-{i}")))
    results = await _all(tasks)
    assert results == [f"model-{m}:{m}-{i}" for i in range(5) for m in "ab"]
    assert sorted((m, len(r)) for m, r in records) == [("model-a", 5), ("model-b", 5)]
    assert batcher._lanes == {}  # idle queues are dropped


async def test_multiplexed_batches_do_not_run_before_model_batch_fills() -> None:
    records: list[tuple[str, list[str]]] = []
    batcher = _recording_batcher(records, max_batch_size=5, batch_wait_timeout_s=1000)
    a_tasks = [_as_request("model-a", lambda i=i: batcher(f"a-{i}")) for i in range(4)]
    first_b = _as_request("model-b", lambda: batcher("b-0"))
    await _settle()
    assert records == []
    a_tasks.append(_as_request("model-a", lambda: batcher("a-4")))
    assert await _all(a_tasks) == [f"model-a:a-{i}" for i in range(5)]
    await _settle()
    assert not first_b.done()
    assert records == [("model-a", [f"a-{i}" for i in range(5)])]
    b_tasks = [first_b] + [
        _as_request("model-b", lambda i=i: batcher(f"b-{i}")) for i in range(1, 5)
    ]
    assert await _all(b_tasks) == [f"model-b:b-{i}" for i in range(5)]


async def test_a_queue_whose_callers_all_left_is_dropped() -> None:
    batcher = _recording_batcher([], max_batch_size=10, batch_wait_timeout_s=1000)
    task = _as_request("model-a", lambda: batcher("request"))
    await _settle()
    assert next(iter(batcher._lanes.values())).queues.keys() == {"model-a"}
    task.cancel()
    await _settle()
    assert batcher._lanes == {}


async def test_each_model_runs_up_to_max_concurrent_batches_of_its_own() -> None:
    running: dict[str, int] = {}
    release = asyncio.Event()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0, max_concurrent_batches=1)
    async def blocked(requests: list[str]) -> list[str]:
        model = requests[0][:7]
        running[model] = running.get(model, 0) + 1
        await release.wait()
        running[model] -= 1
        return requests

    calls = ["model-a:1", "model-b:1", "model-c:1", "model-a:2"]
    tasks = [_as_request(c[:7], lambda c=c: blocked(c)) for c in calls]
    await _settle()
    # As Ray runs the per-model sub-batches of a batch side by side: one batch per model at
    # once, while the second batch of model-a waits for the first.
    assert running == {"model-a": 1, "model-b": 1, "model-c": 1}
    assert not tasks[3].done()
    release.set()
    assert await _all(tasks) == calls


async def test_a_batch_whose_callers_all_left_is_cancelled() -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def endless(values: list[int]) -> AsyncIterator[list[int]]:
        try:
            started.set()
            while True:
                yield values
                await asyncio.sleep(0)
        finally:
            stopped.set()

    gens = [endless(1), endless(2)]
    assert await asyncio.wait_for(gens[0].__anext__(), BOUND_S) == 1
    await gens[0].aclose()
    assert await asyncio.wait_for(gens[1].__anext__(), BOUND_S) == 2  # the other goes on
    assert not stopped.is_set()
    await gens[1].aclose()
    await asyncio.wait_for(stopped.wait(), BOUND_S)


class Host:
    @serve.batch
    async def unary(self, values: list[int]) -> list[int]:
        return values

    @serve.batch
    async def streaming(self, values: list[int]) -> AsyncIterator[list[int]]:
        yield values


async def test_inspect_and_the_replica_see_what_the_user_wrote() -> None:
    host = Host()
    assert inspect.iscoroutinefunction(host.unary)
    assert inspect.isasyncgenfunction(host.streaming)
    assert _kind(host.unary) == "async"
    assert _kind(host.streaming) == "asyncgen"
    assert _kind(vectorized) == "async"  # a function deployment
    assert _kind(Models.stream) == "asyncgen"
    assert list(inspect.signature(host.unary).parameters) == ["values"]
    assert [v async for v in host.streaming(1)] == [1]


async def test_a_batched_method_survives_pickling() -> None:
    clone = pickle.loads(cloudpickle.dumps(Doubler))()
    assert await asyncio.gather(clone.double(1), clone.double(2)) == [2, 4]
    assert clone.batches == [[1, 2]]
