"""Deployments the e2e tests use to coordinate with replicas (importable by replicas)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import serve


@serve.deployment(max_ongoing_requests=1000)
class Signal:
    """A latch shared by replicas and the test: ``wait()`` blocks until ``send()``."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiters = 0

    async def wait(self) -> None:
        self._waiters += 1
        try:
            await self._event.wait()
        finally:
            self._waiters -= 1

    def send(self, clear: bool = False) -> None:
        self._event.set()
        if clear:
            self._event = asyncio.Event()

    def num_waiters(self) -> int:
        return self._waiters


@serve.deployment(max_ongoing_requests=1000)
class Recorder:
    """Collects events from replicas so tests can assert on what happened where."""

    def __init__(self) -> None:
        self._events: list[Any] = []

    def add(self, event: Any) -> None:
        self._events.append(event)

    def events(self) -> list[Any]:
        return list(self._events)

    def count(self, event: Any) -> int:
        return self._events.count(event)


def pid() -> int:
    return os.getpid()
