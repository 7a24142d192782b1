"""Model multiplexing the way Ray Serve's guide uses it; a Ray program would differ only in its
import (``from ray import serve``).

A replica keeps at most ``max_num_models_per_replica`` models loaded (the least recently used
one is dropped), routers send a model's requests to replicas that already hold it, and
``serve.get_multiplexed_model_id()`` tells the replica which model a request is for. Callers
choose the model per call with ``handle.options(multiplexed_model_id=...)``, from a driver or
from another deployment. Run it with ``python examples/multiplexing.py``.
"""

import os
import time

import serve
from serve.handle import DeploymentHandle


class FakeModel:
    """Stands in for weights fetched from storage (nothing is downloaded here)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def predict(self, text: str) -> str:
        return f"{self.model_id}({text})"


# --8<-- [start:server]
@serve.deployment(num_replicas=2)
class ModelServer:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> FakeModel:
        self.loads.append(model_id)
        return FakeModel(model_id)

    async def __call__(self, text: str) -> tuple[str, int]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return model.predict(text), os.getpid()


# --8<-- [end:server]


# --8<-- [start:callers]
@serve.deployment
class Frontend:
    """Picks the model from the request, as an HTTP ingress would from a header."""

    def __init__(self, models: DeploymentHandle) -> None:
        self._models = models

    async def __call__(self, model_id: str, text: str) -> str:
        answer, _ = await self._models.options(multiplexed_model_id=model_id).remote(text)
        return answer


models: DeploymentHandle = serve.run(ModelServer.bind(), name="models")
for model_id in ("sentiment", "summary", "sentiment"):
    answer, pid = models.options(multiplexed_model_id=model_id).remote("hi").result()
    assert answer == f"{model_id}(hi)"
# Requests for a model go where it is loaded, once routers have heard where that is (replicas
# report their models to the controller, which tells every router).
summary = models.options(multiplexed_model_id="summary")
deadline = time.monotonic() + 10
while len({summary.remote("x").result()[1] for _ in range(5)}) != 1:
    assert time.monotonic() < deadline, "summary requests kept landing on several replicas"
    time.sleep(0.2)

frontend = serve.run(Frontend.bind(ModelServer.bind()), name="frontend", route_prefix="/frontend")
assert frontend.remote("translate", "bonjour").result() == "translate(bonjour)"
# --8<-- [end:callers]

# --8<-- [start:batching]
import asyncio


@serve.deployment
class BatchedModels:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> FakeModel:
        return FakeModel(model_id)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.1)
    async def __call__(self, texts: list[str]) -> list[str]:
        # Each model fills batches of its own: one model id per batch.
        model = await self.get_model(serve.get_multiplexed_model_id())
        return [f"{model.predict(text)} in a batch of {len(texts)}" for text in texts]


batched = serve.run(BatchedModels.bind(), name="batched", route_prefix="/batched")


async def mixed() -> list[str]:
    calls = [("a", "1"), ("b", "2"), ("a", "3"), ("b", "4")]
    return await asyncio.gather(
        *(batched.options(multiplexed_model_id=m).remote(text) for m, text in calls)
    )


print(asyncio.run(mixed()))
# --8<-- [end:batching]

serve.shutdown()
print("multiplexing example OK")
