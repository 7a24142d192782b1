"""The queues behind ``@serve.batch``: callers waiting per model id, and the batches they form.

Everything here runs on the replica's loop. A :class:`Lane` holds one owner's (deployment
instance's) calls on one loop; it keeps a :class:`_Queue` per multiplexed model id, which
collects callers into batches and runs them through the :class:`BatchSource` (the decorated
function) that made the lane.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from serve import _tracing
from serve._context import (
    RequestContext,
    set_batch_requests,
    set_current_deadline,
    set_current_request,
)
from serve._signature import transpose_calls

logger = logging.getLogger(__name__)

_ITEM, _ERROR, _END = "item", "error", "end"


class BatchSource(Protocol):
    """What the queues need of a batched function (``serve._batching._Batched``)."""

    name: str
    func: Callable[..., Any]
    signature: Any
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: Callable[[list[Any]], int] | None

    def check_results(self, results: Any, expected: int) -> None: ...
    def forget(self, key: tuple[int, int], lane: Lane) -> None: ...


def _context_with(
    request: RequestContext | None, batch: tuple[RequestContext, ...] = ()
) -> contextvars.Context:
    """A copy of the current context in which ``request`` is the request being served (and
    its deadline the one nested calls inherit), for the callers of ``batch``."""
    context = contextvars.copy_context()
    context.run(set_current_request, request)
    context.run(set_current_deadline, request.deadline_s if request is not None else 0.0)
    context.run(set_batch_requests, batch)
    if _tracing.enabled and request is not None and request.trace is not None:
        context.run(_tracing.enter_request, request)  # the batch's calls: this one's children
    return context


def _latest_deadline(batch: list[Caller]) -> float:
    """The deadline a batch's nested calls inherit: 0.0 (none) if any caller has none."""
    latest = 0.0
    for caller in batch:
        deadline_s = caller.request.deadline_s if caller.request is not None else 0.0
        if not deadline_s:
            return 0.0
        latest = max(latest, deadline_s)
    return latest


class Caller:
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


async def receive(caller: Caller) -> AsyncIterator[Any]:
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

    callers: list[Caller]
    settled: bool = False  # the user's function is done: leaving callers no longer cancel it
    task: asyncio.Task[None] | None = None

    def cancel_if_abandoned(self) -> None:
        if not self.settled and self.task is not None and all(c.gone for c in self.callers):
            self.task.cancel()


class Lane:
    """The calls of one owner (deployment instance) on one loop: one queue per model id.

    Each multiplexed model fills its own batches and runs up to ``max_concurrent_batches`` of
    them at once, independently of the other models (as Ray runs the per-model sub-batches of a
    batch side by side).
    """

    def __init__(self, batched: BatchSource, owner: Any, key: tuple[int, int]) -> None:
        self.batched = batched
        self.owner = owner
        self.key = key
        self.queues: dict[str, _Queue] = {}

    def put(self, caller: Caller) -> None:
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

    def __init__(self, lane: Lane, model_id: str) -> None:
        self._lane = lane
        self._batched = lane.batched
        self._owner = lane.owner
        self.model_id = model_id
        self._waiting: deque[Caller] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self._batched.max_concurrent_batches)
        self._collector: asyncio.Task[None] | None = None
        self._running: set[_Run] = set()  # children of the collector's group

    def put(self, caller: Caller) -> None:
        self._waiting.append(caller)
        self._arrived.set()
        caller.watch(self._arrived.set)  # a caller leaving may end the wait for a batch
        if self._collector is None or self._collector.done():
            self._collector = asyncio.get_running_loop().create_task(
                self._collect(), name=f"batch:{self._batched.name}", context=_context_with(None)
            )

    async def _collect(self) -> None:
        """The queue's owner: forms batches while callers wait, each batch a child of its
        group. Ends once nothing waits and no batch runs; then the queue is forgotten."""
        try:
            while self._waiting:  # a caller may arrive while the group waits for its last run
                async with asyncio.TaskGroup() as runs:
                    await self._form_batches(runs)
        finally:
            self._forget_if_idle()

    async def _form_batches(self, runs: asyncio.TaskGroup) -> None:
        while True:
            self._drop_gone()
            if not self._waiting:
                if not self._running:
                    return
                self._arrived.clear()
                await self._arrived.wait()  # a caller, or the end of a batch
                continue
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if batch:
                self._start(runs, batch)
            else:
                self._slots.release()

    def _drop_gone(self) -> None:
        if any(caller.gone for caller in self._waiting):
            self._waiting = deque(caller for caller in self._waiting if not caller.gone)

    async def _next_batch(self) -> list[Caller]:
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

    def _refuse(self, caller: Caller, exc: BaseException) -> None:
        caller.fail(exc)
        self._waiting.remove(caller)

    def _start(self, runs: asyncio.TaskGroup, batch: list[Caller]) -> None:
        """Run the batch under the slot the collector holds for it."""
        run = _Run(batch)
        first = batch[0].request
        # The batch runs on behalf of its first caller, with the model of all of them; the
        # requests it makes are its own, not children a single caller's cancel would end. They
        # inherit the latest deadline of its callers: the batch is needed until that one.
        request = (
            None
            if first is None
            else dataclasses.replace(first, children=set(), deadline_s=_latest_deadline(batch))
        )
        callers = tuple(c.request for c in batch if c.request is not None)
        run.task = runs.create_task(
            self._run_in_slot(run),
            name=f"batch:{self._batched.name}:run",
            context=_context_with(request, callers),
        )
        self._running.add(run)
        for caller in batch:
            caller.watch(run.cancel_if_abandoned)

    async def _run_in_slot(self, run: _Run) -> None:
        """One child of the collector's group: a failed batch never cancels its siblings."""
        try:
            await self._run(run)
        except Exception:
            logger.exception("A batch of %s failed", self._batched.name)
        finally:
            self._running.discard(run)
            self._slots.release()
            self._arrived.set()  # the collector may wait for the last batch to end

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
        if not self._waiting and not self._running:
            self._lane.forget(self)
