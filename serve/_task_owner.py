"""Task owners: a component's tasks as children of one ``asyncio.TaskGroup`` for its life.

A TaskGroup cancels every sibling, and its owner, as soon as one child raises. A component's
tasks are independent (one failed replica call, batch or proxy must not end the others), so
each child runs under :func:`guarded`, which logs its error and returns; only cancellation
crosses it.

:class:`TaskOwner` is the long-lived owner for a component with an async ``start()`` and an
``aclose()``: a task that enters the group and waits; ``aclose()`` cancels it, which cancels
every child and waits for them (as long as their cleanup takes, as an explicit
cancel-and-gather would). Components whose own loop is the natural owner (a node's proxies,
a batch queue's collector) enter the group themselves and use :func:`guarded` alone.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any

logger = logging.getLogger(__name__)


async def guarded(coro: Coroutine[Any, Any, None], log: logging.Logger) -> None:
    """Run one child of a group: its error is logged here, so its siblings keep running."""
    try:
        await coro
    except Exception:
        task = asyncio.current_task()
        log.exception("Task %s failed", task.get_name() if task is not None else "?")


class TaskOwner:
    """One named task whose TaskGroup owns a component's tasks from ``start()`` to ``aclose()``.

    ``spawn`` before ``start()`` or after ``aclose()`` closes the coroutine unrun: nobody would
    cancel or await its task.
    """

    def __init__(self, name: str, log: logging.Logger) -> None:
        self._name = name
        self._log = log
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._entered: asyncio.Future[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the owner (once); returns once its group takes children."""
        if self._task is None:
            self._entered = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._own(self._entered), name=self._name)
        assert self._entered is not None
        await asyncio.wait([self._entered, self._task], return_when=asyncio.FIRST_COMPLETED)

    async def _own(self, entered: asyncio.Future[None]) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            entered.set_result(None)
            await asyncio.get_running_loop().create_future()  # until aclose() cancels it

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[None] | None:
        """Start ``coro`` as a child (its errors logged); None if the owner is not running."""
        if self._group is None or self._closed:
            coro.close()
            return None
        return self._group.create_task(guarded(coro, self._log), name=name, context=context)

    async def aclose(self) -> None:
        """Cancel every child and wait for them to end. Idempotent."""
        self._closed = True
        task = self._task
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            self._log.error("Task owner %s failed", self._name, exc_info=task.exception())
