"""The multiplexed model cache, in one process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import serve
from serve._context import ReplicaContext, set_replica_context
from serve._models import DeploymentID, ReplicaID
from serve._multiplex import registry


@pytest.fixture(autouse=True)
def in_a_replica() -> Iterator[None]:
    replica_id = ReplicaID("u1", DeploymentID("D", "app"))
    set_replica_context(ReplicaContext("app", "D", "u1", replica_id))
    yield
    set_replica_context(None)
    registry.set_listener(None)


class Loader:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.unloaded: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get(self, model_id: str) -> Model:
        self.loads.append(model_id)
        await asyncio.sleep(0.01)
        return Model(model_id, self.unloaded)


class Model:
    def __init__(self, model_id: str, unloaded: list[str]) -> None:
        self.model_id = model_id
        self._unloaded = unloaded

    async def __del__(self) -> None:  # an async __del__ is awaited on eviction
        self._unloaded.append(self.model_id)


async def test_lru_with_eviction_and_hits() -> None:
    loader = Loader()
    for model_id in ["a", "b", "a", "c", "a"]:
        assert (await loader.get(model_id)).model_id == model_id
    assert loader.loads == ["a", "b", "c"]
    assert loader.unloaded == ["b"]


async def test_concurrent_requests_for_one_id_load_once() -> None:
    loader = Loader()
    models = await asyncio.gather(*(loader.get("x") for _ in range(10)))
    assert loader.loads == ["x"]
    assert len({id(m) for m in models}) == 1


async def test_model_ids_must_be_non_empty_strings() -> None:
    loader = Loader()
    with pytest.raises(TypeError, match="must be a string"):
        await loader.get(3)
    with pytest.raises(ValueError, match="must not be empty"):
        await loader.get("")


async def test_listener_hears_an_id_while_it_loads() -> None:
    seen: list[frozenset[str]] = []
    registry.set_listener(seen.append)
    loader = Loader()
    task = asyncio.ensure_future(loader.get("p"))
    await asyncio.sleep(0)  # the load has started, not finished
    assert not task.done()
    assert any("p" in ids for ids in seen)
    await task


def test_each_instance_has_its_own_cache() -> None:
    first, second = Loader(), Loader()
    asyncio.run(first.get("a"))
    asyncio.run(second.get("a"))
    assert first.loads == second.loads == ["a"]
