"""Load shedding: when a deployment's queue is full, answer 429 with a Retry-After header
instead of queueing more (Ray 2.58's BackpressureConfig).
Run it: ``python examples/load_shedding.py``.

``max_ongoing_requests`` bounds what each replica runs at once and ``max_queued_requests`` what
waits for a replica; a request beyond both is dropped at once. By default the answer is 503;
``backpressure_config`` makes it 429 (which load balancers do not count as the server failing)
and adds ``Retry-After``.
"""

import asyncio
import os

import httpx
from starlette.requests import Request

import serve
from serve.config import BackpressureConfig


@serve.deployment(
    max_ongoing_requests=1,
    max_queued_requests=1,
    backpressure_config=BackpressureConfig(status_code=429, retry_after_s=2),
)
class SlowModel:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(1.0)
        return "done"


async def burst(url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        replies = await asyncio.gather(*(client.get(url) for _ in range(4)))
    for reply in sorted(replies, key=lambda r: r.status_code):
        print(reply.status_code, reply.headers.get("retry-after", "-"), reply.text[:60])


if __name__ == "__main__":
    serve.start(http_options={"port": int(os.environ.get("SERVE_DEFAULT_HTTP_PORT", "8000"))})
    serve.run(SlowModel.bind(), name="model")
    address = next(iter(serve.status().proxy_details.values())).http_address
    asyncio.run(burst(f"http://{address}/"))
    serve.shutdown()
