# ruff: noqa: E402, UP028, UP035 - Ray's doc code as it is: each section imports what it uses and redefines its classes
"""The streaming examples of Ray Serve's docs, changed only in their import: ``import serve`` for
``from ray import serve`` and ``serve.handle`` for ``ray.serve.handle``.

- HTTP streaming responses and client disconnects, from the HTTP guide's "Streaming responses"
  (doc/source/serve/doc_code/http_guide/streaming_example.py in ray-project/ray, Apache-2.0);
- streaming through a DeploymentHandle with ``options(stream=True)``, from the model composition
  guide (doc/source/serve/doc_code/model_composition/streaming_example.py, same repository).

Run it with ``python examples/streaming_guide.py``: it serves on http://localhost:8000 as Ray
does (set SERVE_DEFAULT_HTTP_PORT to use another port; the URLs below follow it).
"""

import os

BASE = f"http://localhost:{os.environ.get('SERVE_DEFAULT_HTTP_PORT', '8000')}"

# http_guide/streaming_example.py

# __begin_example__
import time
from typing import Generator

import requests
from starlette.requests import Request
from starlette.responses import StreamingResponse

import serve


@serve.deployment
class StreamingResponder:
    def generate_numbers(self, max: int) -> Generator[str, None, None]:
        for i in range(max):
            yield str(i)
            time.sleep(0.1)

    def __call__(self, request: Request) -> StreamingResponse:
        max = request.query_params.get("max", "25")
        gen = self.generate_numbers(int(max))
        return StreamingResponse(gen, status_code=200, media_type="text/plain")


serve.run(StreamingResponder.bind())

r = requests.get(f"{BASE}?max=10", stream=True)
start = time.time()
r.raise_for_status()
for chunk in r.iter_content(chunk_size=None, decode_unicode=True):
    print(f"Got result {round(time.time() - start, 1)}s after start: '{chunk}'")
# __end_example__


r = requests.get(f"{BASE}?max=10", stream=True)
r.raise_for_status()
for i, chunk in enumerate(r.iter_content(chunk_size=None, decode_unicode=True)):
    assert chunk == str(i)


# __begin_cancellation__
import asyncio
import time
from typing import AsyncGenerator

import requests
from starlette.requests import Request
from starlette.responses import StreamingResponse

import serve


@serve.deployment
class StreamingResponder:
    async def generate_forever(self) -> AsyncGenerator[str, None]:
        try:
            i = 0
            while True:
                yield str(i)
                i += 1
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            print("Cancelled! Exiting.")

    def __call__(self, request: Request) -> StreamingResponse:
        gen = self.generate_forever()
        return StreamingResponse(gen, status_code=200, media_type="text/plain")


serve.run(StreamingResponder.bind())

r = requests.get(f"{BASE}?max=10", stream=True)
start = time.time()
r.raise_for_status()
for i, chunk in enumerate(r.iter_content(chunk_size=None, decode_unicode=True)):
    print(f"Got result {round(time.time() - start, 1)}s after start: '{chunk}'")
    if i == 10:
        print("Client disconnecting")
        break
# __end_cancellation__

# model_composition/streaming_example.py

# __streaming_example_start__
# File name: stream.py
from typing import AsyncGenerator, Generator

import serve
from serve.handle import DeploymentHandle, DeploymentResponseGenerator


@serve.deployment
class Streamer:
    def __call__(self, limit: int) -> Generator[int, None, None]:
        for i in range(limit):
            yield i


@serve.deployment
class Caller:
    def __init__(self, streamer: DeploymentHandle):
        self._streamer = streamer.options(
            # Must set `stream=True` on the handle, then the output will be a
            # response generator.
            stream=True,
        )

    async def __call__(self, limit: int) -> AsyncGenerator[int, None]:
        # Response generator can be used in an `async for` block.
        r: DeploymentResponseGenerator = self._streamer.remote(limit)
        async for i in r:
            yield i


app = Caller.bind(Streamer.bind())

handle: DeploymentHandle = serve.run(app).options(
    stream=True,
)

# Response generator can also be used as a regular generator in a sync context.
r: DeploymentResponseGenerator = handle.remote(10)
assert list(r) == list(range(10))
# __streaming_example_end__

print("Streaming guide OK")
serve.shutdown()
