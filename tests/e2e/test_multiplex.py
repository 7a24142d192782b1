"""Model multiplexing through real daemons."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

import serve
from tests.support.apps import Recorder
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


class Model:
    def __init__(self, model_id: str, recorder: Any) -> None:
        self.model_id = model_id
        self._recorder = recorder

    def __del__(self) -> None:
        self._recorder.add.remote(f"unload:{self.model_id}:{os.getpid()}")


@serve.deployment(num_replicas=2, max_ongoing_requests=20)
class Multi:
    def __init__(self, recorder: Any) -> None:
        self._recorder = recorder

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        await self._recorder.add.remote(f"load:{model_id}:{os.getpid()}")
        await asyncio.sleep(0.2)
        return Model(model_id, self._recorder)

    async def __call__(self) -> tuple[str, int]:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return model.model_id, os.getpid()


def _deploy() -> tuple[Any, Any]:
    handle = serve.run(Multi.bind(Recorder.bind()), name="multi")
    return handle, serve.get_deployment_handle("Recorder", "multi")


def test_requests_for_a_model_stick_to_the_replica_that_loaded_it() -> None:
    h, recorder = _deploy()
    m1 = h.options(multiplexed_model_id="m1")
    model_id, pid = m1.remote().result()
    assert model_id == "m1"
    # Routers learn the replica's model ids quickly; then every m1 request goes there.
    wait_for(lambda: all(m1.remote().result()[1] == pid for _ in range(10)), timeout_s=5)
    loads = [e for e in recorder.events.remote().result() if e.startswith("load:m1:")]
    assert loads == [f"load:m1:{pid}"]


def test_concurrent_requests_for_one_model_load_it_once() -> None:
    h, recorder = _deploy()
    m2 = h.options(multiplexed_model_id="m2")

    async def main() -> set[int]:
        results = await asyncio.gather(*(m2.remote() for _ in range(10)))
        return {pid for _, pid in results}

    pids = asyncio.run(main())
    loads = [e for e in recorder.events.remote().result() if e.startswith("load:m2:")]
    assert len(loads) == len(pids)  # at most one load per replica that served


def test_lru_eviction_calls_del() -> None:
    handle = serve.run(Multi.options(num_replicas=1).bind(Recorder.bind()), name="lru")
    recorder = serve.get_deployment_handle("Recorder", "lru")
    for model_id in ["a", "b", "a", "c"]:  # "b" is least recently used when "c" arrives
        assert handle.options(multiplexed_model_id=model_id).remote().result()[0] == model_id
    wait_for(lambda: any(e.startswith("unload:b:") for e in recorder.events.remote().result()))
    events = recorder.events.remote().result()
    assert [e.split(":")[1] for e in events if e.startswith("load:")] == ["a", "b", "c"]
    assert [e.split(":")[1] for e in events if e.startswith("unload:")] == ["b"]


def test_decorator_misuse_is_caught_at_decoration_time() -> None:
    with pytest.raises(TypeError, match="needs an async function"):

        @serve.multiplexed
        def sync_loader(model_id: str) -> None:
            pass

    with pytest.raises(TypeError, match="exactly one model id parameter"):

        @serve.multiplexed
        async def no_id() -> None:
            pass

    with pytest.raises(TypeError, match="must be an integer"):
        serve.multiplexed(max_num_models_per_replica="3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive, or -1"):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(TypeError, match="not a class"):
        serve.multiplexed(Model)


def test_loader_outside_a_deployment_raises() -> None:
    @serve.multiplexed
    async def loader(model_id: str) -> str:
        return model_id

    with pytest.raises(RuntimeError, match="only be used within a deployment"):
        asyncio.run(loader("x"))


def test_model_id_defaults_to_empty_and_options_apply_to_the_call_only() -> None:
    @serve.deployment
    class Echo:
        def __call__(self) -> str:
            return serve.get_multiplexed_model_id()

    h = serve.run(Echo.bind(), name="mid")
    assert h.remote().result() == ""
    assert h.options(multiplexed_model_id="x").remote().result() == "x"
    assert serve.get_multiplexed_model_id() == ""
