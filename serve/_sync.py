"""Threads and event loops: the only module that hops between them.

Every router and channel of a process lives on one *home loop*: the replica's own loop inside a
replica, or a background IO thread (started lazily) in a driver. Handles can be used from any
thread and any loop; this module carries work onto the home loop (``post``) and results back to
whoever waits (``Completion``), coalescing wake-ups so that many requests cost few syscalls.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

SYNC_IN_LOOP_MESSAGE = (
    "Sync methods should not be called from within an `asyncio` event loop. "
    "Use `await response` instead."
)

_lock = threading.Lock()
_home_loop: asyncio.AbstractEventLoop | None = None
_home_thread_id: int | None = None
_io_thread: threading.Thread | None = None
_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = (
    weakref.WeakKeyDictionary()
)


class Mailbox:
    """Runs callables on one loop, posted from any thread, with one wake-up per batch."""

    __slots__ = ("__weakref__", "_items", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._scheduled = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._items.append((fn, args))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody will ever run these
                self._scheduled = False
                self._items.clear()

    def _drain(self) -> None:
        # Clear the flag before popping: an item appended after this point either is popped
        # below or schedules another drain.
        self._scheduled = False
        items = self._items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception:
                logger.exception("Callback %r posted to the event loop failed", fn)


_last_mailbox: Mailbox | None = None  # most posts go to the same loop as the last one


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    global _last_mailbox
    last = _last_mailbox
    if last is not None and last._loop is loop:
        return last
    box = _mailboxes.get(loop)
    if box is None:
        with _lock:
            box = _mailboxes.get(loop)
            if box is None:
                box = _mailboxes[loop] = Mailbox(loop)
    _last_mailbox = box
    return box


def set_home_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Make the calling thread's running loop the home loop (replicas call this at start)."""
    global _home_loop, _home_thread_id
    with _lock:
        _home_loop = loop
        _home_thread_id = threading.get_ident()


def home_loop() -> asyncio.AbstractEventLoop:
    """The loop that owns routers and channels; starts the driver's IO thread on first use."""
    loop = _home_loop
    if loop is not None:
        return loop
    return _start_io_thread()


def is_home_thread() -> bool:
    return _home_thread_id is not None and threading.get_ident() == _home_thread_id


def _start_io_thread() -> asyncio.AbstractEventLoop:
    global _home_loop, _home_thread_id, _io_thread
    import uvloop

    with _lock:
        if _home_loop is not None:
            return _home_loop
        loop = uvloop.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            global _home_thread_id
            asyncio.set_event_loop(loop)
            _home_thread_id = threading.get_ident()
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        thread = threading.Thread(target=run, name="serve-io", daemon=True)
        thread.start()
        ready.wait()
        _home_loop = loop
        _io_thread = thread
        return loop


def stop_io_thread(timeout_s: float = 5.0) -> None:
    """Stop the driver's IO thread (at interpreter exit); a no-op inside replicas."""
    global _home_loop, _home_thread_id, _io_thread
    with _lock:
        thread, loop = _io_thread, _home_loop
        if thread is None or loop is None:
            return
        _home_loop = _home_thread_id = _io_thread = None
    try:
        loop.call_soon_threadsafe(loop.stop)
    except RuntimeError:
        return
    thread.join(timeout_s)


def post(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` on the home loop: at once if already there, else soon."""
    if is_home_thread():
        fn(*args)
    else:
        mailbox(home_loop()).post(fn, *args)


def in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_sync(coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
    """Run a coroutine on the home loop and block the calling thread for its result."""
    if is_home_thread():
        coro.close()
        raise RuntimeError(
            "This serve API blocks, and was called on the event loop that serve itself runs "
            "on (inside a deployment). Call it from a thread instead, for example "
            "`await asyncio.to_thread(serve.status)`."
        )
    future = asyncio.run_coroutine_threadsafe(coro, home_loop())
    try:
        return future.result(timeout_s)
    except BaseException:
        future.cancel()
        raise


async def run_on_home(coro: Coroutine[Any, Any, T]) -> T:
    """Await a coroutine that must run on the home loop, from any loop."""
    if is_home_thread():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, home_loop()))


class _SyncWaiter:
    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()


class Completion:
    """A result set once on the home loop and awaited from any loop or thread, many times.

    Unlike ``asyncio.Future`` it can be awaited from foreign loops and waited on from threads;
    unlike ``concurrent.futures.Future`` it costs no lock on the home loop's own path.
    """

    __slots__ = ("_callbacks", "_done", "_error", "_home_waiters", "_value", "_waiters")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._home_waiters: list[asyncio.Future[None]] | None = None
        self._waiters: list[Any] | None = None  # _SyncWaiter or (loop, future)
        self._callbacks: list[Callable[[Completion], None]] | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: BaseException | None) -> None:
        """Home loop only. The first outcome wins; later ones are ignored."""
        if self._done:
            return
        self._value, self._error = value, error
        with _lock:
            self._done = True
            waiters, self._waiters = self._waiters, None
        for fut in self._home_waiters or ():
            _wake(fut)
        self._home_waiters = None
        _wake_all(waiters)
        if self._callbacks:
            callbacks, self._callbacks = self._callbacks, None
            for callback in callbacks:
                callback(self)

    def add_done_callback(self, callback: Callable[[Completion], None]) -> None:
        """Home loop only: ``callback(self)`` runs on the home loop when done."""
        if self._done:
            callback(self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def error(self) -> BaseException | None:
        return self._error

    def wait_sync(self, timeout_s: float | None) -> Any:
        """Block this thread until done; TimeoutError leaves the completion untouched."""
        if not self._done:
            waiter = _SyncWaiter()
            with _lock:
                registered = not self.done()  # completion may have raced us
                if registered:
                    if self._waiters is None:
                        self._waiters = []
                    self._waiters.append(waiter)
            if registered:
                acquired = waiter.lock.acquire(
                    timeout=-1 if timeout_s is None else max(timeout_s, 0.0)
                )
                if not acquired:
                    with _lock:
                        if self._waiters is not None and waiter in self._waiters:
                            self._waiters.remove(waiter)
                    if not self._done:
                        raise TimeoutError(f"Timed out after {timeout_s}s waiting for the result.")
        return self.outcome()

    async def wait(self) -> Any:
        """Await from any loop; cancelling the awaiting task does not affect the result."""
        if not self._done:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            if is_home_thread():
                if self._home_waiters is None:
                    self._home_waiters = []
                self._home_waiters.append(fut)
            else:
                with _lock:
                    if self.done():  # completion raced us
                        fut.set_result(None)
                    else:
                        if self._waiters is None:
                            self._waiters = []
                        self._waiters.append((loop, fut))
            await fut
        return self.outcome()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ItemQueue:
    """Stream items pushed on the home loop, taken from any thread or loop, closed once."""

    __slots__ = ("_closed", "_error", "_items", "_waiters")

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._closed = False
        self._error: BaseException | None = None
        self._waiters: list[Any] | None = None

    def push(self, item: Any) -> None:
        """Home loop only."""
        with _lock:
            self._items.append(item)
            waiters, self._waiters = self._waiters, None
        _wake_all(waiters)

    def close(self, error: BaseException | None = None, *, drop: bool = False) -> None:
        """Home loop only: no more items; ``error`` is raised after the items already pushed
        (or at once, with ``drop``)."""
        with _lock:
            if self._closed:
                return
            self._closed = True
            if drop:
                self._items.clear()
            self._error = error
            waiters, self._waiters = self._waiters, None
        _wake_all(waiters)

    def _take(self) -> tuple[bool, Any]:
        """(True, item), or (False, None) when closed and empty; the caller holds _lock."""
        if self._items:
            return True, self._items.popleft()
        if self._closed:
            if self._error is not None:
                raise self._error
            return False, None
        return False, self

    def get_sync(self, timeout_s: float | None = None) -> tuple[bool, Any]:
        """Block for the next item: (True, item), or (False, None) once the stream ended."""
        while True:
            with _lock:
                found, item = self._take()
                if found or item is None:
                    return found, item
                waiter = _SyncWaiter()
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append(waiter)
            if not waiter.lock.acquire(timeout=-1 if timeout_s is None else timeout_s):
                with _lock:
                    if self._waiters is not None and waiter in self._waiters:
                        self._waiters.remove(waiter)
                raise TimeoutError(f"Timed out after {timeout_s}s waiting for the next item.")

    async def get(self) -> tuple[bool, Any]:
        """Await the next item from any loop: (True, item), or (False, None) once it ended."""
        loop = asyncio.get_running_loop()
        while True:
            with _lock:
                found, item = self._take()
                if found or item is None:
                    return found, item
                fut: asyncio.Future[None] = loop.create_future()
                if self._waiters is None:
                    self._waiters = []
                self._waiters.append((loop, fut))
            await fut


def _wake_all(waiters: list[Any] | None) -> None:
    if not waiters:
        return
    home = is_home_thread()
    for waiter in waiters:
        if isinstance(waiter, _SyncWaiter):
            waiter.lock.release()
        else:
            loop, fut = waiter
            if home and loop is _home_loop:
                _wake(fut)
            else:
                mailbox(loop).post(_wake, fut)
