"""Sync user code on worker threads, with hand-offs batched in both directions.

A sync method never runs on the replica's event loop (Ray runs sync methods in a thread pool
too). What a crossing costs is the wake-ups, so:

- loop -> threads: jobs go into one queue; an idle worker takes the next job as soon as it is
  free, without waking anyone when every worker is busy;
- threads -> loop: finished jobs are posted to the loop's mailbox, which schedules one callback
  for everything that finished since the loop last looked (one wake-up per batch, not per call).

A sync generator runs on a worker that fills a bounded buffer; the loop drains it in batches.
A job that has not started when its request is cancelled never runs; one that runs cannot be
interrupted (Python allows no more) and keeps its admission slot until it returns.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import queue
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

from serve._sync import mailbox

_STOP = object()
GENERATOR_BUFFER = 64  # items a sync generator may produce ahead of its consumer ...
GENERATOR_BUFFER_BYTES = 4 * 1024 * 1024  # ... and about this many bytes (sys.getsizeof)


QUEUED, RUNNING, SKIPPED = 0, 1, 2


class Job:
    """One call of sync user code: ``future`` gets its outcome on the loop."""

    __slots__ = ("args", "context", "finished", "fn", "future", "kwargs", "on_finish", "state")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = contextvars.copy_context()
        self.future = future
        self.state = QUEUED
        self.finished = False  # its outcome reached the loop
        self.on_finish: Callable[[], None] | None = None  # runs on the loop once it returned


class SyncWorkers:
    """Up to ``max_workers`` threads running sync user code for one replica's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_workers: int) -> None:
        self._loop = loop
        self._mailbox = mailbox(loop)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_workers = max(1, max_workers)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = 0
        self._closed = False

    def resize(self, max_workers: int) -> None:
        self._max_workers = max(1, max_workers)

    def start(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Job:
        """Queue ``fn(*args, **kwargs)`` with the caller's context; await ``job.future``."""
        job = Job(fn, args, kwargs, self._loop.create_future())
        self._submit(job)
        return job

    def skip(self, job: Job) -> bool:
        """Make sure a queued job never runs; False if it already started (or finished)."""
        with self._lock:
            if job.state == QUEUED:
                job.state = SKIPPED
                return True
            return False

    def _submit(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("The replica is stopping: no more sync calls.")
        self._jobs.put(job)
        with self._lock:
            if self._idle == 0 and len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._work, name=f"serve-user-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _work(self) -> None:
        jobs = self._jobs
        post = self._mailbox.post
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                with self._lock:
                    self._idle += 1
                try:
                    job = jobs.get()
                finally:
                    with self._lock:
                        self._idle -= 1
            if job is _STOP:
                return
            with self._lock:
                if job.state == SKIPPED:
                    continue
                job.state = RUNNING
            try:
                value = job.context.run(job.fn, *job.args, **job.kwargs)
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                post(_fail, job, exc)
            else:
                post(_succeed, job, value)

    def shutdown(self) -> None:
        """Stop the threads once they are idle (running user code is not interrupted)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(_STOP)

    async def stream(self, generator: Generator[Any, Any, Any]) -> AsyncGenerator[Any, None]:
        """Iterate a sync generator on a worker: it fills a bounded buffer the loop drains.

        Closing this async iterator (the consumer stopped, or the request was cancelled)
        closes the generator on its thread once it yields next.
        """
        pump = _GeneratorPump(self._loop, generator)
        job = self.start(pump.run, (), {})
        try:
            while True:
                items = await pump.take()
                if items is None:
                    break
                for item in items:
                    yield item
            await job.future  # raises what the generator raised
        finally:
            pump.stop()
            if self.skip(job):
                generator.close()


def _succeed(job: Job, value: Any) -> None:
    _finish(job, value, None)


def _fail(job: Job, exc: BaseException) -> None:
    _finish(job, None, exc)


def _finish(job: Job, value: Any, exc: BaseException | None) -> None:
    """On the loop: the job's outcome reaches its awaiting coroutine (if still awaiting)."""
    job.finished = True
    if not job.future.done():
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(value)
    if job.on_finish is not None:
        job.on_finish()


class _GeneratorPump:
    """Runs a sync generator on a worker thread into a bounded buffer."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, generator: Generator[Any, Any, Any]
    ) -> None:
        self._generator = generator
        self._mailbox = mailbox(loop)
        self._loop = loop
        self._buffer: collections.deque[Any] = collections.deque()
        self._space = threading.Condition(threading.Lock())
        self._buffered_bytes = 0
        self._stopped = False
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._wake_posted = False

    def run(self) -> None:
        """On the worker: produce until the generator ends, fails or is stopped."""
        generator = self._generator
        try:
            while True:
                # Wait for room before producing: nothing is made that could not be buffered.
                with self._space:
                    while self._full() and not self._stopped:
                        self._space.wait()
                    if self._stopped:
                        break
                try:
                    item = next(generator)
                except StopIteration:
                    break
                size = sys.getsizeof(item)
                with self._space:
                    if self._stop_requested():  # the consumer may have gone meanwhile
                        break
                    self._buffer.append(item)
                    self._buffered_bytes += size
                    wake = not self._wake_posted
                    self._wake_posted = True
                if wake:
                    self._mailbox.post(self._wake)
        finally:
            generator.close()  # a stopped stream runs the generator's finally, on its thread
            with self._space:
                self._ended = True
                wake = not self._wake_posted
                self._wake_posted = True
            if wake:
                self._mailbox.post(self._wake)

    def _stop_requested(self) -> bool:
        return self._stopped

    def _full(self) -> bool:
        """Whether the worker must wait (the lock is held). One item always fits."""
        buffered = len(self._buffer)
        return buffered >= GENERATOR_BUFFER or (
            buffered > 0 and self._buffered_bytes >= GENERATOR_BUFFER_BYTES
        )

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Any] | None:
        """On the loop: every item buffered now (at least one), or None once it ended."""
        while True:
            with self._space:
                self._wake_posted = False
                if self._buffer:
                    items = list(self._buffer)
                    self._buffer.clear()
                    self._buffered_bytes = 0
                    self._space.notify()
                    return items
                if self._ended:
                    return None
                self._waiter = self._loop.create_future()
                waiter = self._waiter
            await waiter

    def stop(self) -> None:
        with self._space:
            self._stopped = True
            self._space.notify()
