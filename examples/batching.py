"""@serve.batch the way Ray Serve's batching guide uses it; a Ray program would differ only in
its import (``from ray import serve``).

Covers: a batched ``__call__`` returning a numpy array, batch parameters changed from
``reconfigure`` (so a config file's ``user_config`` can tune them), a batched async generator
streaming one item per caller per step (``StopIteration`` ends one caller's stream), and
``batch_size_fn`` batching by a measure other than the number of calls. Run it with
``python examples/batching.py`` (it needs numpy).
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

import serve
from serve.handle import DeploymentHandle


# --8<-- [start:basic]
@serve.deployment
class Doubler:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def __call__(self, samples: list[int]) -> np.ndarray:
        return np.array(samples) * 2  # one vectorized call for the whole batch


doubler: DeploymentHandle = serve.run(Doubler.bind(), name="doubler")
pending = [doubler.remote(i) for i in range(8)]
assert [int(r.result()) for r in pending] == [2 * i for i in range(8)]
# --8<-- [end:basic]


# --8<-- [start:reconfigure]
@serve.deployment(user_config={"max_batch_size": 4, "batch_wait_timeout_s": 0.2})
class Tunable:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def __call__(self, samples: list[int]) -> list[int]:
        return [s + 1 for s in samples]

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.__call__.set_max_batch_size(config["max_batch_size"])
        self.__call__.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])

    def limits(self) -> tuple[int, float]:
        return self.__call__._get_max_batch_size(), self.__call__._get_batch_wait_timeout_s()


tunable = serve.run(Tunable.bind(), name="tunable", route_prefix="/tunable")
assert [r.result() for r in [tunable.remote(i) for i in range(3)]] == [1, 2, 3]
assert tunable.limits.remote().result() == (4, 0.2)
# --8<-- [end:reconfigure]


# --8<-- [start:stream]
@serve.deployment
class Counter:
    @serve.batch(max_batch_size=5, batch_wait_timeout_s=0.1)
    async def count_to(self, limits: list[int]) -> Any:
        for step in range(max(limits)):
            # One item per caller at every step; a caller whose count is done stops here.
            yield [str(step) if step < limit else StopIteration for limit in limits]
            await asyncio.sleep(0.01)


counter = serve.run(Counter.bind(), name="counter", route_prefix="/counter")
counter = counter.options(stream=True)
limits = [1, 2, 5, 6, 9]
with ThreadPoolExecutor(max_workers=len(limits)) as pool:
    streams = list(pool.map(lambda n: list(counter.count_to.remote(n)), limits))
for limit, items in zip(limits, streams, strict=True):
    assert items == [str(i) for i in range(limit)], (limit, items)
# --8<-- [end:stream]


# --8<-- [start:size_fn]
class Document:
    def __init__(self, words: int) -> None:
        self.words = words


@serve.deployment
class Summarizer:
    @serve.batch(
        max_batch_size=1000,  # words per batch, not documents
        batch_wait_timeout_s=0.05,
        batch_size_fn=lambda documents: sum(d.words for d in documents),
    )
    async def summarize(self, documents: list[Document]) -> list[str]:
        return [f"{d.words} words, in a batch of {len(documents)}" for d in documents]


summarizer = serve.run(Summarizer.bind(), name="summarizer", route_prefix="/summarizer")
sizes = [600, 300, 300, 50]
answers = [r.result() for r in [summarizer.summarize.remote(Document(n)) for n in sizes]]
assert [a.split(" words")[0] for a in answers] == [str(n) for n in sizes]
# --8<-- [end:size_fn]

serve.shutdown()
print("batching guide OK")
