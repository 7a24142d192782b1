"""Heartbeats on the controller's long-lived streams: no sockets, short periods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from controller.liveness import with_heartbeats

PERIOD_S = 0.02
TIMEOUT_S = 0.2


async def peer(beats: asyncio.Queue[str | None]) -> AsyncIterator[object]:
    """What the other end sends: an item per queue entry; None closes its side."""
    while (item := await beats.get()) is not None:
        yield item


async def quiet() -> AsyncIterator[str]:
    await asyncio.Event().wait()
    yield "never"


def stream(
    requests: AsyncIterator[object], updates: AsyncIterator[str], silent: list[bool]
) -> AsyncIterator[str]:
    return with_heartbeats(
        requests,
        updates,
        "heartbeat",
        period_s=PERIOD_S,
        timeout_s=TIMEOUT_S,
        on_silent=lambda: silent.append(True),
        name="test",
    )


async def test_updates_pass_and_heartbeats_fill_the_silence_while_the_peer_talks() -> None:
    beats: asyncio.Queue[str | None] = asyncio.Queue()

    async def updates() -> AsyncIterator[str]:
        yield "first"
        await asyncio.sleep(10 * PERIOD_S)
        yield "second"

    silent: list[bool] = []
    seen = []
    async for item in stream(peer(beats), updates(), silent):
        seen.append(item)
        beats.put_nowait("beat")  # the peer answers every message
        if item == "second":
            break
    assert seen[0] == "first"
    assert seen[-1] == "second"
    assert "heartbeat" in seen[1:-1]
    assert not silent


async def test_a_silent_peer_ends_the_stream_and_is_reported() -> None:
    beats: asyncio.Queue[str | None] = asyncio.Queue()
    silent: list[bool] = []
    async with asyncio.timeout(5):
        items = [item async for item in stream(peer(beats), quiet(), silent)]
    assert silent == [True]
    assert set(items) == {"heartbeat"}


async def test_a_peer_that_closes_its_side_ends_the_stream_quietly() -> None:
    beats: asyncio.Queue[str | None] = asyncio.Queue()
    beats.put_nowait(None)
    silent: list[bool] = []
    async with asyncio.timeout(5):
        assert [item async for item in stream(peer(beats), quiet(), silent)] == []
    assert not silent
