"""Streaming HTTP responses: a generator behind Starlette's ``StreamingResponse`` sends each
chunk as it is produced, and a client that hangs up stops the generator in the replica.
Run it: ``python examples/http_streaming.py``.
"""

import os
import time

import httpx

import serve

BASE = f"http://127.0.0.1:{os.environ.get('SERVE_DEFAULT_HTTP_PORT', '8000')}"

# --8<-- [start:chunks]
from collections.abc import Iterator

from starlette.requests import Request
from starlette.responses import StreamingResponse


@serve.deployment
class Ticker:
    def ticks(self, count: int) -> Iterator[str]:
        for i in range(count):
            time.sleep(0.05)  # a sync generator runs on a worker thread, never on the loop
            yield f"tick {i}\n"

    def __call__(self, request: Request) -> StreamingResponse:
        count = int(request.query_params.get("count", "5"))
        return StreamingResponse(self.ticks(count), media_type="text/plain")


serve.run(Ticker.bind(), name="ticker", route_prefix="/ticks")
arrivals = []
with httpx.stream("GET", f"{BASE}/ticks", params={"count": 4}) as response:
    for line in response.iter_lines():
        arrivals.append((time.monotonic(), line))
assert [line for _, line in arrivals] == ["tick 0", "tick 1", "tick 2", "tick 3"]
assert arrivals[-1][0] - arrivals[0][0] > 0.1  # lines came as they were made, not at the end
# --8<-- [end:chunks]

# --8<-- [start:disconnect]
import asyncio
from collections.abc import AsyncIterator


@serve.deployment
class Feed:
    def __init__(self) -> None:
        self.stopped_early = 0

    async def updates(self) -> AsyncIterator[str]:
        try:
            n = 0
            while True:  # never ends by itself
                yield f"update {n}\n"
                n += 1
                await asyncio.sleep(0.02)
        except asyncio.CancelledError:
            self.stopped_early += 1  # the client hung up: clean up here
            raise

    def __call__(self, request: Request) -> StreamingResponse:
        return StreamingResponse(self.updates(), media_type="text/plain")

    def stopped(self) -> int:
        return self.stopped_early


feed = serve.run(Feed.bind(), name="feed", route_prefix="/feed")
with httpx.stream("GET", f"{BASE}/feed") as response:
    for i, _ in enumerate(response.iter_lines()):
        if i == 3:
            break  # leaving the block closes the connection
deadline = time.monotonic() + 30
while feed.stopped.remote().result() != 1:
    assert time.monotonic() < deadline, "the generator was not stopped"
    time.sleep(0.05)
# --8<-- [end:disconnect]

serve.shutdown()
print("http streaming example OK")
