"""``@serve.batch``: gather concurrent calls into one call that takes a list per argument.

Each caller passes one value per argument; a batch of calls runs as one call whose every
argument is the list of those values, in call order. It returns one result per call (a list,
or anything with ``len()`` such as a numpy array) or, for an async generator, yields one item
per call at every step. A batch starts once ``max_batch_size`` inputs are waiting (measured by
``batch_size_fn`` when given) or ``batch_wait_timeout_s`` after its first input arrived; at most
``max_concurrent_batches`` batches run at once. Each multiplexed model fills batches of its
own (they share that limit), in which ``serve.get_multiplexed_model_id()`` is that model's id.

An exception raised by a batch, or a result of the wrong length, reaches every caller in it. A
streaming caller whose item is ``StopIteration`` (the class) has its stream ended while the
others go on. A batch whose callers have all gone (cancelled, or stopped reading) is cancelled,
as a lone request would be.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
import types
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from serve._context import RequestContext, current_request, set_current_request
from serve._signature import inputs_signature, transpose_calls
from serve.exceptions import ServeError

logger = logging.getLogger(__name__)

_ITEM, _ERROR, _END = "item", "error", "end"


def _check_max_batch_size(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_batch_size must be an integer >= 1, got {value!r}.")
    if value < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {value!r}.")
    return value


def _check_batch_wait_timeout_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"batch_wait_timeout_s must be a number of seconds >= 0, got {value!r}.")
    if math.isnan(value) or value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number of seconds >= 0, got {value!r}.")
    return float(value)


def _check_max_concurrent_batches(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(f"max_concurrent_batches must be an integer >= 1, got {value!r}.")
    return value


def _check_batch_size_fn(value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"batch_size_fn must be a callable or None, got {type(value)}.")


def _context_with(request: RequestContext | None) -> contextvars.Context:
    """A copy of the current context in which ``request`` is the request being served."""
    context = contextvars.copy_context()
    context.run(set_current_request, request)
    return context


class _Caller:
    """One call waiting for (or in) a batch: its arguments and where its outcome goes."""

    def __init__(
        self, call: inspect.BoundArguments, request: RequestContext | None, streaming: bool
    ) -> None:
        self.call = call
        self.request = request
        self.model_id = request.multiplexed_model_id if request is not None else ""
        loop = asyncio.get_running_loop()
        self.future: asyncio.Future[Any] | None = None if streaming else loop.create_future()
        self.items: asyncio.Queue[tuple[str, Any]] | None = asyncio.Queue() if streaming else None
        self.arrived = loop.time()
        self.size: int | None = None  # batch_size_fn of this input alone, once computed
        self.finished = False  # its outcome (a result, an error, the end of its stream) is sent
        self.left = False  # a streaming caller stopped reading
        self.on_gone: Callable[[], None] | None = None

    @property
    def first_input(self) -> Any:
        """What ``batch_size_fn`` measures: the value of the first argument."""
        return next(iter(self.call.arguments.values()), None)

    @property
    def gone(self) -> bool:
        if self.future is not None:
            return self.future.cancelled()
        return self.left

    def watch(self, on_gone: Callable[[], None]) -> None:
        if self.future is not None:
            self.future.add_done_callback(lambda f: on_gone() if f.cancelled() else None)
        else:
            self.on_gone = on_gone

    def leave(self) -> None:
        self.left = True
        if self.on_gone is not None:
            self.on_gone()

    def send(self, value: Any) -> None:
        """Its result (unary) or its next item (streaming)."""
        if self.finished:
            return
        if self.future is not None:
            self.finished = True
            if not self.future.done():
                self.future.set_result(value)
        elif self.items is not None:
            self.items.put_nowait((_ITEM, value))

    def fail(self, exc: BaseException) -> None:
        if self.finished:
            return
        self.finished = True
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(exc)
        elif self.items is not None:
            self.items.put_nowait((_ERROR, exc))

    def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.items is not None:
            self.items.put_nowait((_END, None))


async def _receive(caller: _Caller) -> AsyncIterator[Any]:
    """A streaming caller's own stream: the items the batch yields for it."""
    assert caller.items is not None
    try:
        while True:
            kind, value = await caller.items.get()
            if kind == _ITEM:
                yield value
            elif kind == _ERROR:
                raise value
            else:
                return
    finally:
        caller.leave()


@dataclasses.dataclass(eq=False)
class _Run:
    """One batch of callers for one model, running the user's function."""

    callers: list[_Caller]
    settled: bool = False  # the user's function is done: leaving callers no longer cancel it
    task: asyncio.Task[None] | None = None

    def cancel_if_abandoned(self) -> None:
        if not self.settled and self.task is not None and all(c.gone for c in self.callers):
            self.task.cancel()


class _Lane:
    """The calls of one owner (deployment instance) on one loop: one queue per model id.

    Each multiplexed model fills its own batches; all of them share ``max_concurrent_batches``.
    """

    def __init__(self, batched: _Batched, owner: Any, key: tuple[int, int]) -> None:
        self.batched = batched
        self.owner = owner
        self.key = key
        self.slots = asyncio.Semaphore(batched.max_concurrent_batches)
        self.queues: dict[str, _Queue] = {}

    def put(self, caller: _Caller) -> None:
        queue = self.queues.get(caller.model_id)
        if queue is None:
            queue = self.queues[caller.model_id] = _Queue(self, caller.model_id)
        queue.put(caller)

    def forget(self, queue: _Queue) -> None:
        if self.queues.get(queue.model_id) is queue:
            del self.queues[queue.model_id]
        if not self.queues:
            self.batched.forget(self.key, self)


class _Queue:
    """The calls of one lane for one model id, waiting to be batched."""

    def __init__(self, lane: _Lane, model_id: str) -> None:
        self._lane = lane
        self._batched = lane.batched
        self._owner = lane.owner
        self.model_id = model_id
        self._waiting: deque[_Caller] = deque()
        self._arrived = asyncio.Event()
        self._slots = lane.slots
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    def put(self, caller: _Caller) -> None:
        self._waiting.append(caller)
        self._arrived.set()
        caller.watch(self._arrived.set)  # a caller leaving may end the wait for a batch
        if self._collector is None or self._collector.done():
            self._collector = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batch:{self._batched.name}", context=_context_with(None)
            )

    async def _collect(self) -> None:
        try:
            while True:
                self._drop_gone()
                if not self._waiting:
                    return
                await self._slots.acquire()
                try:
                    batch = await self._next_batch()
                except BaseException:
                    self._slots.release()
                    raise
                if batch:
                    self._start(batch)
                else:
                    self._slots.release()
        finally:
            self._forget_if_idle()

    def _drop_gone(self) -> None:
        if any(caller.gone for caller in self._waiting):
            self._waiting = deque(caller for caller in self._waiting if not caller.gone)

    async def _next_batch(self) -> list[_Caller]:
        """Wait until a batch is due, then take its callers off the queue."""
        batched = self._batched
        # A batch keeps the settings it started with; setters apply to the batches after it.
        max_size = batched.max_batch_size
        size_fn = batched.batch_size_fn
        loop = asyncio.get_running_loop()
        self._drop_gone()
        if not self._waiting:
            return []
        # Measured from the arrival of the batch's first input, which may have waited for a slot.
        deadline = self._waiting[0].arrived + batched.batch_wait_timeout_s
        while True:
            self._drop_gone()
            fit = self._fit(max_size, size_fn)
            if fit is None:
                continue  # an input was refused; look again
            if not self._waiting:
                return []
            count, full = fit
            remaining = deadline - loop.time()
            if full or remaining <= 0:
                return [self._waiting.popleft() for _ in range(count)]
            self._arrived.clear()
            if math.isinf(remaining):
                await self._arrived.wait()
                continue
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    def _fit(
        self, max_size: int, size_fn: Callable[[list[Any]], int] | None
    ) -> tuple[int, bool] | None:
        """How many waiting callers the next batch takes, and whether it cannot grow.

        Returns None after refusing an input that can never fit (or that ``batch_size_fn``
        fails on): that caller gets the error and leaves the queue.
        """
        if size_fn is None:
            return min(len(self._waiting), max_size), len(self._waiting) >= max_size
        inputs: list[Any] = []
        for caller in self._waiting:
            inputs.append(caller.first_input)
            try:
                if caller.size is None:
                    caller.size = size_fn([caller.first_input])
                alone = caller.size
                size = alone if len(inputs) == 1 else size_fn(inputs)
            except Exception as exc:
                self._refuse(caller, exc)
                return None
            if alone > max_size:
                self._refuse(
                    caller,
                    RuntimeError(
                        f"An input to @serve.batch function {self._batched.name} has size "
                        f"{alone} by batch_size_fn, more than max_batch_size={max_size}: it "
                        "can never be batched. Raise max_batch_size or check batch_size_fn."
                    ),
                )
                return None
            if size > max_size:  # it waits for the next batch, in its place
                return len(inputs) - 1, True
            if size >= max_size:
                return len(inputs), True
        return len(inputs), False

    def _refuse(self, caller: _Caller, exc: BaseException) -> None:
        caller.fail(exc)
        self._waiting.remove(caller)

    def _start(self, batch: list[_Caller]) -> None:
        """Run the batch under the slot the collector holds for it."""

        def finished(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._slots.release()
            if not task.cancelled() and task.exception() is not None:
                logger.error("A batch of %s failed", self._batched.name, exc_info=task.exception())
            self._forget_if_idle()

        run = _Run(batch)
        first = batch[0].request
        # The batch runs on behalf of its first caller, with the model of all of them; the
        # requests it makes are its own, not children a single caller's cancel would end.
        request = None if first is None else dataclasses.replace(first, children=set())
        run.task = asyncio.get_running_loop().create_task(
            self._run(run), name=f"batch:{self._batched.name}:run", context=_context_with(request)
        )
        self._running.add(run.task)
        run.task.add_done_callback(finished)
        for caller in batch:
            caller.watch(run.cancel_if_abandoned)

    async def _run(self, run: _Run) -> None:
        batched = self._batched
        callers = run.callers
        try:
            args, kwargs = transpose_calls(batched.signature, [c.call for c in callers])
            if self._owner is not None:
                args = (self._owner, *args)
            produced = batched.func(*args, **kwargs)
            if inspect.isasyncgen(produced):
                await self._stream(run, produced)
            else:
                results = await produced
                run.settled = True
                batched.check_results(results, len(callers))
                for caller, result in zip(callers, results, strict=False):
                    caller.send(result)
        except asyncio.CancelledError:
            for caller in callers:
                if caller.future is not None:
                    caller.future.cancel()
                else:
                    caller.fail(asyncio.CancelledError())
            raise
        except Exception as exc:
            run.settled = True
            for caller in callers:
                caller.fail(exc)

    async def _stream(self, run: _Run, produced: Any) -> None:
        callers = run.callers
        try:
            async for results in produced:
                self._batched.check_results(results, len(callers))
                for caller, result in zip(callers, results, strict=False):
                    if result is StopIteration or result is StopAsyncIteration:
                        caller.end()
                    else:
                        caller.send(result)
                if all(caller.finished or caller.gone for caller in callers):
                    break
        finally:
            run.settled = True
            await produced.aclose()
        for caller in callers:
            caller.end()

    def _forget_if_idle(self) -> None:
        """Drop this queue once it has nothing to do, so owners and loops are not kept alive."""
        collector = self._collector
        if (
            collector is not None
            and not collector.done()
            and collector is not asyncio.current_task()
        ):
            return
        if not self._waiting and not self._running:
            self._lane.forget(self)


class _Batched:
    """The decorated function. Module-level classes, so cloudpickle ships them by reference.

    ``__code__``, ``__defaults__`` and ``__kwdefaults__`` are the user function's, so ``inspect``
    (and the replica, which decides how to run a method with it) sees what the user wrote:
    a coroutine function or an async generator function.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
        batch_size_fn: Callable[[list[Any]], int] | None,
    ) -> None:
        self.func = func
        self.name = func.__qualname__
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn
        self.signature, self.is_method = inputs_signature(func)
        self._lanes: dict[tuple[int, int], _Lane] = {}
        functools.update_wrapper(cast(Callable[..., Any], self), func)

    @property
    def __code__(self) -> types.CodeType:
        return self.func.__code__

    @property
    def __defaults__(self) -> tuple[Any, ...] | None:
        return self.func.__defaults__

    @property
    def __kwdefaults__(self) -> dict[str, Any] | None:
        return self.func.__kwdefaults__

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lanes"] = {}
        del state["signature"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.signature, self.is_method = inputs_signature(self.func)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return types.MethodType(cast(Callable[..., Any], self), instance)

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Change ``max_batch_size`` for the batches that start from now on."""
        self.max_batch_size = _check_max_batch_size(new_max_batch_size)

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Change ``batch_wait_timeout_s`` for the batches that start from now on."""
        self.batch_wait_timeout_s = _check_batch_wait_timeout_s(new_batch_wait_timeout_s)

    def _get_max_batch_size(self) -> int:
        return self.max_batch_size

    def _get_batch_wait_timeout_s(self) -> float:
        return self.batch_wait_timeout_s

    def check_results(self, results: Any, expected: int) -> None:
        try:
            length = len(results)
        except TypeError:
            raise TypeError(
                f"@serve.batch function {self.name} must return (or yield) one result per input "
                f"in a list or another sized sequence; it gave a {type(results).__name__}."
            ) from None
        if length != expected:
            raise ServeError(
                f"@serve.batch function {self.name} did not preserve the batch size: it got "
                f"{expected} inputs and gave {length} results; give exactly one per input."
            )

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], streaming: bool) -> _Caller:
        owner = None
        if self.is_method:
            if not args:
                raise TypeError(f"{self.name} is a method: call it on an instance.")
            owner, args = args[0], args[1:]
        try:
            call = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        caller = _Caller(call, current_request(), streaming)
        loop = asyncio.get_running_loop()
        key = (id(owner), id(loop))
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(self, owner, key)
        lane.put(caller)
        return caller

    def forget(self, key: tuple[int, int], lane: _Lane) -> None:
        if self._lanes.get(key) is lane:
            del self._lanes[key]


class _BatchedFunction(_Batched):
    """A batched ``async def``: awaiting a call gives that caller's result."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        caller = self.submit(args, kwargs, streaming=False)
        assert caller.future is not None
        return await caller.future


async def _async_generator_template() -> AsyncIterator[None]:  # only its code flags are used
    yield None


class _StreamingCall:
    """``__call__`` of a batched async generator: a plain call that inspects as a generator.

    The call must queue its input at once (a caller that reads only after others have been
    read would otherwise never join their batch), so it cannot be an ``async def ... yield``.
    The replica runs a callable object the way ``inspect`` sees its class's ``__call__``, and
    ``inspect`` takes any object with these attributes for a function.
    """

    __name__ = "__call__"
    __code__ = _async_generator_template.__code__
    __defaults__ = None
    __kwdefaults__ = None
    __annotations__: dict[str, Any] = {}  # read by inspect

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return instance.start

    def __call__(self, instance: _BatchedGenerator, *args: Any, **kwargs: Any) -> Any:
        return instance.start(*args, **kwargs)


class _BatchedGenerator(_Batched):
    """A batched async generator: each call gets its own stream of the items yielded for it."""

    __call__ = _StreamingCall()

    def start(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return _receive(self.submit(args, kwargs, streaming=True))


def batch(
    _func: Callable[..., Any] | None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
) -> Any:
    """Batch concurrent calls: the function takes a list per argument and returns a list.

    Callers pass one value per argument and get one result each. An ``async def`` generator
    yields one item per caller at every step; a caller's stream ends at its ``StopIteration``
    item or when the generator ends. ``batch_size_fn(inputs)`` measures a batch (by its first
    argument's values) instead of ``len``. Change the limits later, e.g. from ``reconfigure``,
    with ``set_max_batch_size()`` and ``set_batch_wait_timeout_s()`` on the batched method.

    Example::

        @serve.deployment
        class Model:
            @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
            async def __call__(self, inputs: list[str]) -> list[int]:
                return [len(text) for text in inputs]

            def reconfigure(self, config: dict) -> None:
                self.__call__.set_max_batch_size(config["max_batch_size"])
    """
    if _func is not None and not callable(_func):
        raise TypeError(f"@serve.batch can only decorate functions or methods, got {_func!r}.")
    max_batch_size = _check_max_batch_size(max_batch_size)
    batch_wait_timeout_s = _check_batch_wait_timeout_s(batch_wait_timeout_s)
    max_concurrent_batches = _check_max_concurrent_batches(max_concurrent_batches)
    _check_batch_size_fn(batch_size_fn)

    def decorate(func: Callable[..., Any]) -> _Batched:
        settings = (max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn)
        if not inspect.isclass(func):
            if inspect.isasyncgenfunction(func):
                return _BatchedGenerator(func, *settings)
            if inspect.iscoroutinefunction(func):
                return _BatchedFunction(func, *settings)
        raise TypeError(
            f"Functions decorated with @serve.batch must be 'async def' (a coroutine or an "
            f"async generator); {getattr(func, '__qualname__', func)!r} is not."
        )

    if _func is not None:
        return decorate(_func)
    return decorate
