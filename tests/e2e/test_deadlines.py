"""Deadlines that travel: a budget set where a request enters follows every nested call.

Replicas report what they saw through marker files (a nested call to a recorder deployment would
inherit the very deadline under test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import serve
from serve._context import current_deadline, request_deadline
from serve.exceptions import RequestTimeoutError
from serve.handle import DeploymentHandle
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


def _mark(path: str, text: str = "") -> None:
    Path(path).write_text(text)


@serve.deployment
class Inner:
    async def sleep(self, marker: str) -> str:
        _mark(marker + ".inner-started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            _mark(marker + ".inner-cancelled")
            raise
        return "slept"

    def ping(self, marker: str) -> str:
        _mark(marker + ".inner-pinged")
        return "pong"


@serve.deployment
class Outer:
    def __init__(self, inner: DeploymentHandle[Any]) -> None:
        self._inner = inner

    async def __call__(self, marker: str) -> str:
        try:
            return await self._inner.sleep.remote(marker)
        except BaseException as exc:
            _mark(marker + ".outer", type(exc).__name__)
            raise

    def sync_call(self, marker: str) -> str:
        # Hold the worker thread until the test has seen the timeout, and until this replica's
        # own deadline (a little later than the driver's, by the time the request took to
        # arrive) has passed too.
        until = time.monotonic() + 30
        while time.monotonic() < until and not (
            Path(marker + ".go").exists() and time.monotonic() >= current_deadline()
        ):
            time.sleep(0.01)
        try:
            result: str = self._inner.ping.remote(marker).result(timeout_s=10)
        except BaseException as exc:
            _mark(marker + ".outer", type(exc).__name__)
            raise
        _mark(marker + ".outer", "no error")
        return result

    def stream(self, marker: str) -> Iterator[str]:
        yield "first"
        until = time.monotonic() + 30  # until this replica's deadline has passed
        while time.monotonic() < min(until, current_deadline()):
            time.sleep(0.01)
        try:
            yield self._inner.ping.remote(marker).result(timeout_s=10)
        except BaseException as exc:
            _mark(marker + ".outer", type(exc).__name__)
            raise

    async def quick(self, marker: str) -> str:
        return await self._inner.ping.remote(marker)


def test_a_nested_call_fails_with_the_timeout_and_the_inner_work_is_cancelled(
    tmp_path: Path,
) -> None:
    h = serve.run(Outer.bind(Inner.bind()), name="deadline-async")
    marker = str(tmp_path / "a")
    with request_deadline(0.5):
        response = h.remote(marker)
    with pytest.raises(RequestTimeoutError) as info:
        response.result(timeout_s=10)
    assert "'deadline-async.Outer' (__call__)" in str(info.value)
    assert isinstance(info.value, TimeoutError)
    # The outer's nested call failed with the timeout, not a cancellation ...
    wait_for(lambda: Path(marker + ".outer").exists())
    assert Path(marker + ".outer").read_text() == "RequestTimeoutError"
    # ... and the inner replica cancelled its work at the deadline, long before its sleep ends.
    assert Path(marker + ".inner-started").exists()
    wait_for(lambda: Path(marker + ".inner-cancelled").exists(), timeout_s=20)


def test_a_sync_methods_nested_call_fails_at_once_past_the_deadline(tmp_path: Path) -> None:
    h = serve.run(Outer.bind(Inner.bind()), name="deadline-sync")
    marker = str(tmp_path / "s")
    with request_deadline(0.5):
        response = h.sync_call.remote(marker)
    # Its thread cannot be interrupted, but its caller hears at the deadline.
    with pytest.raises(RequestTimeoutError):
        response.result(timeout_s=10)
    assert not Path(marker + ".outer").exists()  # the thread still runs
    _mark(marker + ".go")
    wait_for(lambda: Path(marker + ".outer").exists())
    assert Path(marker + ".outer").read_text() == "RequestTimeoutError"
    assert not Path(marker + ".inner-pinged").exists()  # never sent to the inner replica


def test_a_generators_nested_calls_inherit_the_deadline(tmp_path: Path) -> None:
    h = serve.run(Outer.bind(Inner.bind()), name="deadline-stream")
    marker = str(tmp_path / "g")
    with request_deadline(0.5):
        items = h.options(stream=True).stream.remote(marker)
    assert next(items) == "first"
    with pytest.raises(RequestTimeoutError):
        next(items)
    wait_for(lambda: Path(marker + ".outer").exists())
    assert Path(marker + ".outer").read_text() == "RequestTimeoutError"
    assert not Path(marker + ".inner-pinged").exists()


def test_requests_within_their_deadline_or_without_one_behave_as_before(
    tmp_path: Path,
) -> None:
    h = serve.run(Outer.bind(Inner.bind()), name="deadline-none")
    marker = str(tmp_path / "n")
    with request_deadline(30):
        assert h.quick.remote(marker).result(timeout_s=10) == "pong"
    # Outside the scope there is no deadline at all.
    response = h.sync_call.remote(marker)
    _mark(marker + ".go")
    assert response.result(timeout_s=10) == "pong"
    assert Path(marker + ".outer").read_text() == "no error"


def test_a_deadline_that_passed_fails_the_call_without_sending_it(tmp_path: Path) -> None:
    h = serve.run(Outer.bind(Inner.bind()), name="deadline-passed")
    marker = str(tmp_path / "p")
    with request_deadline(0):
        response = h.quick.remote(marker)
    with pytest.raises(RequestTimeoutError, match="already passed"):
        response.result(timeout_s=10)
    assert not Path(marker + ".inner-pinged").exists()
    assert h.quick.remote(marker).result(timeout_s=10) == "pong"
