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
import functools
import inspect
import math
import types
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from serve._batch_queue import Caller, Lane, receive
from serve._context import current_request
from serve._signature import inputs_signature
from serve.exceptions import ServeError

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
        self._lanes: dict[tuple[int, int], Lane] = {}
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
        except TypeError as exc:
            raise TypeError(
                f"@serve.batch function {self.name} must return (or yield) one result per input "
                f"in a list or another sized sequence; it gave a {type(results).__name__}."
            ) from exc
        if length != expected:
            raise ServeError(
                f"@serve.batch function {self.name} did not preserve the batch size: it got "
                f"{expected} inputs and gave {length} results; give exactly one per input."
            )

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], streaming: bool) -> Caller:
        owner = None
        if self.is_method:
            if not args:
                raise TypeError(f"{self.name} is a method: call it on an instance.")
            owner, args = args[0], args[1:]
        try:
            call = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from exc
        caller = Caller(call, current_request(), streaming)
        loop = asyncio.get_running_loop()
        key = (id(owner), id(loop))
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(self, owner, key)
        lane.put(caller)
        return caller

    def forget(self, key: tuple[int, int], lane: Lane) -> None:
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
        return receive(self.submit(args, kwargs, streaming=True))


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
