# ruff: noqa: E402, I001, UP006, UP035 - Ray's doc code as it is (serve imported first, as Ray's)
"""The examples of Ray Serve's model multiplexing guide
(doc/source/serve/doc_code/multiplexed.py in ray-project/ray, Apache-2.0), changed only in their
import: ``import serve`` for ``from ray import serve``.

Here: the model composition example (``__serve_model_composition_example__``, which annotates
with ``starlette.requests.Request`` after a bare ``import starlette``, as Ray allows) and the
batching example (``__serve_multiplexed_batching_example__``, defined without being run, as in
Ray's file). Left out: the first example (``__serve_deployment_example__``, a
``ModelInferencer`` that downloads a torch model from S3 with aioboto3), since it needs torch,
aioboto3 and an S3 bucket, none of which is here; and with it the two snippets that send
requests to that deployment (``__serve_request_send_example__``,
``__serve_handle_send_example__``).

Run it with ``python examples/multiplexing_guide.py``: it serves on http://localhost:8000 as Ray
does (set SERVE_DEFAULT_HTTP_PORT to use another port; the URL below follows it).
"""

import os

BASE = f"http://localhost:{os.environ.get('SERVE_DEFAULT_HTTP_PORT', '8000')}"

import serve
import starlette

# __serve_model_composition_example_begin__
import requests

from serve.handle import DeploymentHandle


@serve.deployment
class Downstream:
    def __call__(self):
        return serve.get_multiplexed_model_id()


@serve.deployment
class Upstream:
    def __init__(self, downstream: DeploymentHandle):
        self._h = downstream

    async def __call__(self, request: starlette.requests.Request):
        return await self._h.options(multiplexed_model_id="bar").remote()


serve.run(Upstream.bind(Downstream.bind()))
resp = requests.get(BASE)
# __serve_model_composition_example_end__
assert resp.text == "bar", resp.text
print(f"Composition: {resp.text}")

# __serve_multiplexed_batching_example_begin__
from typing import List

from starlette.requests import Request

import serve


@serve.deployment(max_ongoing_requests=15)
class BatchedMultiplexModel:
    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str):
        # Load and return your model here
        return model_id

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.1)
    async def batched_predict(self, inputs: List[str]) -> List[str]:
        # Get the model ID - this works correctly inside batched functions
        # because all requests in the batch target the same model
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)

        # Process the batch with the loaded model
        return [f"{model}:{inp}" for inp in inputs]

    async def __call__(self, request: Request):
        # Extract input from the request body
        input_text = await request.body()
        return await self.batched_predict(input_text.decode())


# __serve_multiplexed_batching_example_end__

print("Multiplexing guide OK")
