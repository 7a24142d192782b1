"""serve._sync: work carried onto the home loop, results carried back to any thread or loop.

The ``home`` fixture gives each test a fresh driver IO thread (the module's globals are put
back afterwards, so a home loop another test left running is untouched).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from serve import _sync

T = TypeVar("T")
BOUND_S = 10.0  # every wait here is bounded


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.AbstractEventLoop]:
    for name in ("_home_loop", "_home_thread_id", "_io_thread", "_last_mailbox"):
        monkeypatch.setattr(_sync, name, None)
    loop = _sync.home_loop()
    thread = _sync._io_thread
    assert thread is not None
    yield loop
    _sync.stop_io_thread()
    thread.join(BOUND_S)
    assert not thread.is_alive()


def on_home(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the home loop and return what it returned."""

    async def call() -> T:
        return fn()

    return _sync.run_sync(call(), BOUND_S)


class Other:
    """Another thread with its own running loop (a foreign loop, as a user's)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(BOUND_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(BOUND_S)
        self.loop.close()


@pytest.fixture
def other() -> Iterator[Other]:
    found = Other()
    yield found
    found.close()


# The home loop and its thread.


def test_the_driver_io_thread_is_the_home_loop(home: asyncio.AbstractEventLoop) -> None:
    assert _sync.home_loop() is home
    assert not _sync.is_home_thread()
    assert on_home(_sync.is_home_thread)
    assert on_home(threading.current_thread).name == "serve-io"


def test_stopping_the_io_thread_twice_is_harmless(home: asyncio.AbstractEventLoop) -> None:
    thread = _sync._io_thread
    _sync.stop_io_thread()
    _sync.stop_io_thread()
    assert thread is not None
    thread.join(BOUND_S)
    assert not thread.is_alive()
    assert not _sync.is_home_thread()


def test_post_from_a_thread_runs_on_the_home_loop_in_order(
    home: asyncio.AbstractEventLoop,
) -> None:
    seen: list[tuple[int, bool]] = []
    done = threading.Event()
    for i in range(100):
        _sync.post(lambda i=i: seen.append((i, _sync.is_home_thread())))
    _sync.post(done.set)
    assert done.wait(BOUND_S)
    assert seen == [(i, True) for i in range(100)]


def test_post_on_the_home_thread_runs_at_once(home: asyncio.AbstractEventLoop) -> None:
    def post_and_look() -> list[str]:
        seen: list[str] = []
        _sync.post(seen.append, "ran")
        return seen  # already run: no hop through the loop

    assert on_home(post_and_look) == ["ran"]


def test_a_failing_posted_callback_is_logged_and_the_rest_still_run(
    home: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def fails() -> None:
        raise ValueError("boom")

    done = threading.Event()
    with caplog.at_level(logging.ERROR, logger="serve._sync"):
        _sync.post(fails)
        _sync.post(done.set)
        assert done.wait(BOUND_S)
    assert "posted to the event loop failed" in caplog.text
    assert "boom" in caplog.text


def test_a_mailbox_of_a_closed_loop_drops_what_is_posted() -> None:
    loop = asyncio.new_event_loop()
    box = _sync.mailbox(loop)
    assert _sync.mailbox(loop) is box  # one per loop
    loop.close()
    box.post(pytest.fail, "never runs")
    box.post(pytest.fail, "never runs either")  # and the box is usable again, not stuck


def test_each_loop_has_its_own_mailbox() -> None:
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert _sync.mailbox(first) is not _sync.mailbox(second)
        assert _sync.mailbox(first) is _sync.mailbox(first)
    finally:
        first.close()
        second.close()


def test_in_running_loop() -> None:
    assert not _sync.in_running_loop()

    async def inside() -> bool:
        return _sync.in_running_loop()

    assert asyncio.run(inside())


# run_sync and run_on_home.


def test_run_sync_returns_the_result_and_raises_the_error(
    home: asyncio.AbstractEventLoop,
) -> None:
    async def ok() -> tuple[str, bool]:
        await asyncio.sleep(0)
        return "ok", _sync.is_home_thread()

    async def fails() -> None:
        raise KeyError("missing")

    assert _sync.run_sync(ok(), BOUND_S) == ("ok", True)
    with pytest.raises(KeyError, match="missing"):
        _sync.run_sync(fails(), BOUND_S)


def test_run_sync_times_out_and_cancels_the_coroutine(home: asyncio.AbstractEventLoop) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError):
        _sync.run_sync(forever(), 0.05)
    assert cancelled.wait(BOUND_S)


def test_run_sync_on_the_home_loop_refuses_instead_of_deadlocking(
    home: asyncio.AbstractEventLoop,
) -> None:
    async def never_awaited() -> None:
        raise AssertionError("must not run")

    def call_it() -> str:
        with pytest.raises(RuntimeError, match=r"asyncio\.to_thread") as info:
            _sync.run_sync(never_awaited())
        return str(info.value)

    # The coroutine is closed, not leaked (an unawaited one would warn, an error here).
    assert "blocks" in on_home(call_it)


def test_run_on_home_from_a_foreign_loop(home: asyncio.AbstractEventLoop, other: Other) -> None:
    async def where() -> bool:
        return _sync.is_home_thread()

    async def from_other() -> bool:
        return await _sync.run_on_home(where())

    assert other.run(from_other())

    async def on_home_itself() -> bool:
        return await _sync.run_on_home(where())

    assert _sync.run_sync(on_home_itself(), BOUND_S)


# Completion.


def test_a_completion_is_waited_on_from_threads_foreign_loops_and_home(
    home: asyncio.AbstractEventLoop, other: Other
) -> None:
    completion = _sync.Completion()
    results: list[Any] = []

    def in_thread() -> None:
        results.append(completion.wait_sync(BOUND_S))

    thread = threading.Thread(target=in_thread)
    thread.start()
    foreign = asyncio.run_coroutine_threadsafe(completion.wait(), other.loop)
    at_home = asyncio.run_coroutine_threadsafe(completion.wait(), home)
    assert not completion.done()
    _sync.post(completion.set_result, 42)
    thread.join(BOUND_S)
    assert results == [42]
    assert foreign.result(BOUND_S) == 42
    assert at_home.result(BOUND_S) == 42
    assert completion.wait_sync(0) == 42  # and again, at once
    assert other.run(completion.wait()) == 42


def test_the_first_outcome_wins(home: asyncio.AbstractEventLoop) -> None:
    completion = _sync.Completion()

    def finish() -> None:
        completion.set_exception(ValueError("first"))
        completion.set_result("second")

    on_home(finish)
    assert isinstance(completion.error(), ValueError)
    with pytest.raises(ValueError, match="first"):
        completion.wait_sync(BOUND_S)
    with pytest.raises(ValueError, match="first"):
        completion.outcome()


def test_wait_sync_times_out_and_the_completion_still_completes(
    home: asyncio.AbstractEventLoop,
) -> None:
    completion = _sync.Completion()
    with pytest.raises(TimeoutError, match=r"0\.05s"):
        completion.wait_sync(0.05)
    assert not completion.done()
    _sync.post(completion.set_result, "late")
    assert completion.wait_sync(BOUND_S) == "late"


def test_cancelling_a_waiter_does_not_touch_the_result(
    home: asyncio.AbstractEventLoop, other: Other
) -> None:
    completion = _sync.Completion()

    async def cancel_a_waiter() -> bool:
        task = asyncio.ensure_future(completion.wait())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return completion.done()

    assert other.run(cancel_a_waiter()) is False
    _sync.post(completion.set_result, "still here")
    assert completion.wait_sync(BOUND_S) == "still here"


def test_done_callbacks_run_on_the_home_loop_once(home: asyncio.AbstractEventLoop) -> None:
    completion = _sync.Completion()
    calls: list[tuple[str, Any, bool]] = []

    def record(name: str) -> Callable[[_sync.Completion], None]:
        return lambda c: calls.append((name, c.outcome(), _sync.is_home_thread()))

    def add_two_then_finish() -> None:
        completion.add_done_callback(record("a"))
        completion.add_done_callback(record("b"))
        completion.set_result(1)
        completion.set_result(2)  # ignored: no second round of callbacks
        completion.add_done_callback(record("late"))  # already done: runs at once

    on_home(add_two_then_finish)
    assert calls == [("a", 1, True), ("b", 1, True), ("late", 1, True)]


# ItemQueue.


def test_items_arrive_in_order_then_the_end(home: asyncio.AbstractEventLoop, other: Other) -> None:
    queue = _sync.ItemQueue()

    def produce() -> None:
        for i in range(3):
            queue.push(i)
        queue.close()

    _sync.post(produce)
    assert [queue.get_sync(BOUND_S) for _ in range(4)] == [
        (True, 0),
        (True, 1),
        (True, 2),
        (False, None),
    ]
    assert queue.get_sync(BOUND_S) == (False, None)  # the end stays the end
    assert other.run(queue.get()) == (False, None)


def test_a_waiting_consumer_wakes_for_each_item(
    home: asyncio.AbstractEventLoop, other: Other
) -> None:
    queue = _sync.ItemQueue()

    async def consume() -> list[Any]:
        items: list[Any] = []
        while True:
            found, item = await queue.get()
            if not found:
                return items
            items.append(item)

    consumer = asyncio.run_coroutine_threadsafe(consume(), other.loop)
    for i in range(5):
        _sync.post(queue.push, i)
    _sync.post(queue.close)
    assert consumer.result(BOUND_S) == [0, 1, 2, 3, 4]


def test_an_error_comes_after_the_items_already_pushed(home: asyncio.AbstractEventLoop) -> None:
    queue = _sync.ItemQueue()

    def produce() -> None:
        queue.push("a")
        queue.close(RuntimeError("stream broke"))
        queue.close(ValueError("ignored: closed once"))
        queue.push("late")  # pushed after close: still delivered before the error

    on_home(produce)
    assert queue.get_sync(BOUND_S) == (True, "a")
    assert queue.get_sync(BOUND_S) == (True, "late")
    with pytest.raises(RuntimeError, match="stream broke"):
        queue.get_sync(BOUND_S)


def test_close_with_drop_raises_at_once(home: asyncio.AbstractEventLoop) -> None:
    queue = _sync.ItemQueue()

    def produce() -> None:
        queue.push("unread")
        queue.close(RuntimeError("cancelled"), drop=True)

    on_home(produce)
    with pytest.raises(RuntimeError, match="cancelled"):
        queue.get_sync(BOUND_S)


def test_get_sync_times_out_and_the_queue_still_works(home: asyncio.AbstractEventLoop) -> None:
    queue = _sync.ItemQueue()
    with pytest.raises(TimeoutError, match="next item"):
        queue.get_sync(0.05)
    _sync.post(queue.push, "after")
    assert queue.get_sync(BOUND_S) == (True, "after")
