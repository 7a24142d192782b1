"""@serve.batch through real daemons: concurrent requests are grouped in the replica."""

from __future__ import annotations

import asyncio

import pytest

import serve

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment(max_ongoing_requests=100)
class Embedder:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def __call__(self, texts: list[str]) -> list[int]:
        self.sizes.append(len(texts))
        return [len(t) for t in texts]

    def batch_sizes(self) -> list[int]:
        return self.sizes


@serve.deployment
@serve.batch(max_batch_size=4, batch_wait_timeout_s=0.1)
async def upper(texts: list[str]) -> list[str]:
    if "boom" in texts:
        raise ValueError("a bad batch")
    return [t.upper() for t in texts]


def test_concurrent_requests_are_batched() -> None:
    h = serve.run(Embedder.bind(), name="batch")

    async def main() -> list[int]:
        return await asyncio.gather(*(h.remote("x" * i) for i in range(16)))

    assert asyncio.run(main()) == list(range(16))
    sizes = h.batch_sizes.remote().result()
    assert sum(sizes) == 16
    assert max(sizes) == 8  # grouped, not one by one
    assert len(sizes) <= 4


def test_function_deployment_batches_and_errors_reach_the_whole_batch() -> None:
    h = serve.run(upper.bind(), name="batch-fn")

    async def main() -> list[object]:
        return await asyncio.gather(
            *(h.remote(t) for t in ["a", "b", "boom", "c"]), return_exceptions=True
        )

    outcomes = asyncio.run(main())
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert h.remote("ok").result() == "OK"
