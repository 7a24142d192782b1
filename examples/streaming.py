"""Streaming responses the way Ray Serve's guide uses them; a Ray program would differ only in
its import (``from ray import serve``).

A generator method (sync or async) called through ``handle.options(stream=True)`` returns a
``DeploymentResponseGenerator``: iterate it with ``for`` or ``async for`` as items arrive.
Streams compose (an ingress can stream what a downstream deployment yields), and stopping early
cancels the producer. Run it with ``python examples/streaming.py``.
"""

import asyncio
import time
from collections.abc import AsyncGenerator, Generator

import serve
from serve.handle import DeploymentHandle, DeploymentResponseGenerator


# --8<-- [start:generators]
@serve.deployment
class Tokenizer:
    def tokens(self, text: str) -> Generator[str, None, None]:
        yield from text.split()  # a plain sync generator

    async def countdown(self, start: int) -> AsyncGenerator[int, None]:
        for i in range(start, 0, -1):
            yield i
            await asyncio.sleep(0.01)


# --8<-- [end:generators]


# --8<-- [start:compose]
@serve.deployment
class Shouter:
    """Streams another deployment's stream, transformed item by item."""

    def __init__(self, tokenizer: DeploymentHandle) -> None:
        self._tokenizer = tokenizer.options(stream=True)

    async def __call__(self, text: str) -> AsyncGenerator[str, None]:
        stream: DeploymentResponseGenerator = self._tokenizer.tokens.remote(text)
        async for token in stream:
            yield token.upper()


# --8<-- [end:compose]


# --8<-- [start:consume]
tokenizer = serve.run(Tokenizer.bind(), name="tokenizer").options(stream=True)
assert list(tokenizer.tokens.remote("stream me these words")) == ["stream", "me", "these", "words"]


async def first_items() -> list[int]:
    seen = []
    async for i in tokenizer.countdown.remote(1000):
        seen.append(i)
        if len(seen) == 3:
            break  # leaving early cancels the replica's generator
    return seen


started = time.monotonic()
assert asyncio.run(first_items()) == [1000, 999, 998]
assert time.monotonic() - started < 5  # it did not wait for 1000 items
# --8<-- [end:consume]

shouter = serve.run(
    Shouter.bind(Tokenizer.bind()), name="shouter", route_prefix="/shouter"
).options(stream=True)
assert list(shouter.remote("quiet please")) == ["QUIET", "PLEASE"]

serve.shutdown()
print("streaming example OK")
