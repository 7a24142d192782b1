# ruff: noqa: UP006, UP035 - Ray's doc code as it is
"""The examples of Ray Serve's model multiplexing guide
(doc/source/serve/doc_code/multiplexed.py in ray-project/ray, Apache-2.0), changed only in their
import: ``import serve`` for ``from ray import serve``.

Only the last section (``__serve_multiplexed_batching_example__``) is here; as in Ray's file it
defines the deployment without running it. Left out:

- the first example (``__serve_deployment_example__``, a ``ModelInferencer`` that downloads a
  torch model from S3 with aioboto3): it needs torch, aioboto3 and an S3 bucket, none of which
  is here; and with it the two snippets that send requests to that deployment
  (``__serve_request_send_example__``, ``__serve_handle_send_example__``);
- the model composition example (``__serve_model_composition_example__``), for now: it
  annotates with ``starlette.requests.Request`` after only ``import starlette``, which works
  with Ray because ``ray.serve`` imports ``starlette.requests``; ``import serve`` does not, so
  the class statement fails with ``AttributeError: module 'starlette' has no attribute
  'requests'``.

Run it with ``python examples/multiplexing_guide.py``.
"""

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
