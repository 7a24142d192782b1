"""Streaming responses through real daemons."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import serve
from serve.exceptions import RequestCancelledError
from serve.handle import DeploymentHandle, DeploymentResponseGenerator
from tests.support.apps import Recorder, Signal
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment(max_ongoing_requests=20)
class Streamer:
    def __init__(self, signal: Any = None, recorder: Any = None) -> None:
        self._signal = signal
        self._recorder = recorder

    def sync_items(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def async_items(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    def returns_generator(self, n: int) -> Iterator[int]:
        return (i for i in range(n))

    async def gated(self) -> AsyncIterator[str]:
        yield "first"
        await self._signal.wait.remote()
        yield "second"

    async def fails_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise ValueError(f"failed after {n}")

    async def counted(self, n: int) -> AsyncIterator[int]:
        try:
            for i in range(n):
                await self._recorder.add.remote("produced")
                yield i
                await asyncio.sleep(0)
        finally:
            await self._recorder.add.remote("closed")

    def unary(self) -> str:
        return "not a stream"


def _deploy() -> DeploymentHandle[Any]:
    return serve.run(Streamer.bind(Signal.bind(), Recorder.bind()), name="stream")


def test_sync_and_async_generators_stream_to_sync_and_async_consumers() -> None:
    h = _deploy().options(stream=True)
    response = h.sync_items.remote(5)
    assert isinstance(response, DeploymentResponseGenerator)
    assert list(response) == [0, 1, 2, 3, 4]
    assert list(h.async_items.remote(5)) == [0, 1, 2, 3, 4]
    assert list(h.returns_generator.remote(3)) == [0, 1, 2]

    async def consume() -> list[int]:
        return [item async for item in h.async_items.remote(4)]

    assert asyncio.run(consume()) == [0, 1, 2, 3]
    results: list[list[int]] = []
    thread = threading.Thread(target=lambda: results.append(asyncio.run(consume())))
    thread.start()
    thread.join(30)
    assert results == [[0, 1, 2, 3]]


def test_items_arrive_as_they_are_produced() -> None:
    h = _deploy()
    stream = h.options(stream=True).gated.remote()
    assert next(stream) == "first"  # before the generator was allowed to go on
    serve.get_deployment_handle("Signal", "stream").send.remote().result()
    assert list(stream) == ["second"]


def test_an_exception_mid_stream_comes_after_the_items_before_it() -> None:
    stream = _deploy().options(stream=True).fails_after.remote(3)
    got = [next(stream), next(stream), next(stream)]
    with pytest.raises(ValueError, match="failed after 3"):
        next(stream)
    assert got == [0, 1, 2]


def test_zero_items_end_cleanly() -> None:
    h = _deploy().options(stream=True)
    assert list(h.sync_items.remote(0)) == []

    async def consume() -> list[int]:
        return [i async for i in h.async_items.remote(0)]

    assert asyncio.run(consume()) == []


def test_misuse_raises_type_errors_saying_what_to_do() -> None:
    h = _deploy()
    with pytest.raises(
        TypeError, match=r"Method 'async_items' returned a generator\. You must use"
    ):
        h.async_items.remote(3).result()
    with pytest.raises(TypeError, match="returned a generator"):
        h.returns_generator.remote(3).result()
    with pytest.raises(TypeError, match="did not return a generator"):
        list(h.options(stream=True).unary.remote())

    async def await_it() -> None:
        await h.options(stream=True).async_items.remote(1)

    with pytest.raises(TypeError, match="cannot be awaited directly"):
        asyncio.run(await_it())


def test_twenty_thousand_items() -> None:
    h = _deploy().options(stream=True)
    assert sum(1 for _ in h.async_items.remote(20_000)) == 20_000
    assert sum(h.sync_items.remote(20_000)) == sum(range(20_000))


def test_a_consumer_that_stops_reading_pauses_the_generator() -> None:
    h = _deploy()
    recorder = serve.get_deployment_handle("Recorder", "stream")
    stream = h.options(stream=True).counted.remote(10_000)
    assert next(stream) == 0
    time.sleep(1.0)
    produced = recorder.count.remote("produced").result()
    assert produced <= 70, produced  # the stream window (64) plus one in hand
    stream.cancel()
    wait_for(lambda: recorder.count.remote("closed").result() == 1)
    with pytest.raises(RequestCancelledError):
        next(stream)


def test_dropping_the_consumer_stops_the_generator() -> None:
    h = _deploy()
    recorder = serve.get_deployment_handle("Recorder", "stream")
    stream = h.options(stream=True).counted.remote(10_000)
    assert next(stream) == 0
    del stream
    gc.collect()
    wait_for(lambda: recorder.count.remote("closed").result() == 1)
    assert recorder.count.remote("produced").result() <= 70


@serve.deployment
class Relay:
    def __init__(self, source: DeploymentHandle[Any]) -> None:
        self._source = source.options(stream=True)

    async def __call__(self, n: int) -> AsyncIterator[int]:
        async for item in self._source.async_items.remote(n):
            yield item * 10

    async def sync_in_a_deployment(self) -> str:
        try:
            list(self._source.async_items.remote(1))
        except RuntimeError as exc:
            return str(exc)
        return "no error"


def test_a_deployment_streams_what_it_consumes_from_another_stream() -> None:
    relay = serve.run(Relay.bind(Streamer.bind()), name="relay")
    assert list(relay.options(stream=True).remote(5)) == [0, 10, 20, 30, 40]
    assert "should not be called from within an `asyncio` event loop" in (
        relay.sync_in_a_deployment.remote().result()
    )
