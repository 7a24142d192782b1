"""``@serve.batch``: gather concurrent calls into one call that takes and returns a list.

Calls wait at most ``batch_wait_timeout_s`` for a batch to fill up to ``max_batch_size``; at most
``max_concurrent_batches`` batches run at once. An exception raised by the batch, or a result
list of the wrong length, reaches every caller in that batch.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from serve._signature import check_one_input


def _check(max_batch_size: Any, batch_wait_timeout_s: Any, max_concurrent_batches: Any) -> None:
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise TypeError(f"max_batch_size must be an integer, got {max_batch_size!r}.")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
    if (
        isinstance(batch_wait_timeout_s, bool)
        or not isinstance(batch_wait_timeout_s, int | float)
        or math.isnan(batch_wait_timeout_s)
    ):
        raise TypeError(f"batch_wait_timeout_s must be a number, got {batch_wait_timeout_s!r}.")
    if batch_wait_timeout_s < 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s}.")
    if isinstance(max_concurrent_batches, bool) or not isinstance(max_concurrent_batches, int):
        raise TypeError(
            f"max_concurrent_batches must be an integer, got {max_concurrent_batches!r}."
        )
    if max_concurrent_batches < 1:
        raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}.")


class _Queue:
    """The calls of one owner (deployment instance) waiting to be batched, on one loop."""

    def __init__(self, batched: _Batched, owner: Any) -> None:
        self._batched = batched
        self._owner = owner
        self._items: list[tuple[Any, asyncio.Future[Any]]] = []
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(batched.max_concurrent_batches)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._items.append((item, future))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batch:{self._batched.name}"
            )
        return await future

    async def _collect(self) -> None:
        while self._items:
            await self._slots.acquire()
            batched = self._batched
            deadline = asyncio.get_running_loop().time() + batched.batch_wait_timeout_s
            while len(self._items) < batched.max_batch_size:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            batch = self._items[: batched.max_batch_size]
            del self._items[: batched.max_batch_size]
            batch = [(item, future) for item, future in batch if not future.cancelled()]
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(
                self._run(batch), name=f"batch:{batched.name}:run"
            )
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            items = [item for item, _ in batch]
            args = (self._owner, items) if self._owner is not None else (items,)
            try:
                results = await self._batched.func(*args)
                if not isinstance(results, list | tuple) or len(results) != len(items):
                    got = len(results) if isinstance(results, list | tuple) else type(results)
                    raise TypeError(
                        f"@serve.batch function {self._batched.name} must return a list as long "
                        f"as its input ({len(items)}), got {got}."
                    )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._slots.release()


class _Batched:
    """The decorated function. A module-level class, so cloudpickle ships it by reference."""

    def __init__(
        self,
        func: Callable[..., Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
    ) -> None:
        if inspect.isasyncgenfunction(func):
            raise TypeError(
                f"@serve.batch on {func.__qualname__}: batched generators are not supported yet; "
                "return a list with one result per input instead."
            )
        if inspect.isclass(func) or not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"@serve.batch needs an async function or method (async def); "
                f"{getattr(func, '__qualname__', func)!r} is not one."
            )
        self._is_method = check_one_input(
            func, "@serve.batch function", "argument (the list of inputs)"
        )
        self.func = func
        self.name = func.__qualname__
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.max_concurrent_batches = max_concurrent_batches
        self._queues: dict[tuple[int, int], _Queue] = {}
        functools.update_wrapper(self, func)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_queues"] = {}
        return state

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self

        async def bound(item: Any) -> Any:  # a real coroutine function, for introspection
            return await self(instance, item)

        return bound

    def set_max_batch_size(self, value: int) -> None:
        _check(value, self.batch_wait_timeout_s, self.max_concurrent_batches)
        self.max_batch_size = value

    def set_batch_wait_timeout_s(self, value: float) -> None:
        _check(self.max_batch_size, value, self.max_concurrent_batches)
        self.batch_wait_timeout_s = float(value)

    async def __call__(self, *args: Any) -> Any:
        owner = args[0] if self._is_method else None
        if len(args) != (2 if self._is_method else 1):
            raise TypeError(
                f"{self.name} is a @serve.batch function: call it with one input at a time."
            )
        key = (id(owner), id(asyncio.get_running_loop()))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(self, owner)
        return await queue.submit(args[-1])


def batch(
    _func: Callable[..., Any] | None = None,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
) -> Any:
    """Batch concurrent calls: the function takes a list and returns a list of the same length.

    Example::

        @serve.deployment
        class Model:
            @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
            async def __call__(self, inputs: list[str]) -> list[int]:
                return [len(text) for text in inputs]
    """
    _check(max_batch_size, batch_wait_timeout_s, max_concurrent_batches)

    def decorate(func: Callable[..., Any]) -> _Batched:
        return _Batched(func, max_batch_size, batch_wait_timeout_s, max_concurrent_batches)

    if _func is not None:
        return decorate(_func)
    return decorate
