"""Every admitted request gets exactly one outcome, whatever its user code lets escape.

Each case below used to leave its caller waiting forever: no answer was ever sent. Now each is
answered within a second with an error, and the replica keeps serving (same process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from typing import Any

import pytest

import serve
from serve.exceptions import RemoteError, RequestCancelledError

pytestmark = pytest.mark.e2e

ANSWER_WITHIN_S = 1.0


class Custom(BaseException):
    """A BaseException that is not an Exception, as some libraries define."""


class PoisonedResult:
    def __reduce__(self) -> Any:
        raise Custom("no pickling me")


class PoisonedError(Exception):
    def __reduce__(self) -> Any:
        raise Custom("no pickling me either")


async def _inner_task_cancelled() -> None:
    inner = asyncio.ensure_future(asyncio.sleep(10))
    inner.cancel()
    await inner


def _raise(kind: str) -> Any:
    if kind == "futures-cancelled":
        raise concurrent.futures.CancelledError()
    if kind == "custom":
        raise Custom("custom base exception")
    if kind == "system-exit":
        raise SystemExit(3)
    if kind == "keyboard-interrupt":
        raise KeyboardInterrupt
    if kind == "poisoned-result":
        return PoisonedResult()
    if kind == "poisoned-error":
        raise PoisonedError("an exception that cannot be pickled")
    raise AssertionError(kind)


@serve.deployment(max_ongoing_requests=50)
class Hostile:
    def pid(self) -> int:
        return os.getpid()

    async def async_case(self, kind: str) -> Any:
        if kind == "asyncio-cancelled":
            await _inner_task_cancelled()
        return _raise(kind)

    def sync_case(self, kind: str) -> Any:
        return _raise(kind)

    async def async_stream(self, kind: str) -> Any:
        yield "first"
        if kind == "asyncio-cancelled":
            await _inner_task_cancelled()
        yield _raise(kind)

    def sync_stream(self, kind: str) -> Any:
        yield "first"
        yield _raise(kind)


CASES = {
    "asyncio-cancelled": RequestCancelledError,
    "futures-cancelled": concurrent.futures.CancelledError,  # an Exception: the user's own
    "custom": RemoteError,
    "system-exit": RemoteError,
    "keyboard-interrupt": RemoteError,
    "poisoned-result": TypeError,
    "poisoned-error": RemoteError,
}


@pytest.fixture(scope="module")
def hostile(serve_session: None) -> Any:
    handle = serve.run(Hostile.bind(), name="answered")
    yield handle
    serve.delete("answered")


def _combinations(async_method: str, sync_method: str) -> list[tuple[str, str]]:
    """Every case for the async method; the sync one has no event-loop task to cancel."""
    return [(async_method, kind) for kind in sorted(CASES)] + [
        (sync_method, kind) for kind in sorted(CASES) if kind != "asyncio-cancelled"
    ]


@pytest.mark.parametrize(("method", "kind"), _combinations("async_case", "sync_case"))
def test_a_unary_call_is_answered(hostile: Any, method: str, kind: str) -> None:
    pid = hostile.pid.remote().result()
    response = getattr(hostile, method).remote(kind)
    with pytest.raises(CASES[kind]) as info:
        response.result(timeout_s=ANSWER_WITHIN_S)
    if CASES[kind] is RemoteError:
        assert ("PoisonedError" if kind == "poisoned-error" else "") in str(info.value)
    assert hostile.pid.remote().result() == pid  # the replica survived


@pytest.mark.parametrize(("method", "kind"), _combinations("async_stream", "sync_stream"))
def test_a_stream_is_answered_after_its_first_item(hostile: Any, method: str, kind: str) -> None:
    pid = hostile.pid.remote().result()
    stream = getattr(hostile.options(stream=True), method).remote(kind)

    async def consume() -> list[Any]:
        items = []
        async with asyncio.timeout(ANSWER_WITHIN_S):
            async for item in stream:
                items.append(item)
        return items

    with pytest.raises(CASES[kind]):
        asyncio.run(consume())
    assert hostile.pid.remote().result() == pid
