"""A Ray Serve program whose only change is ``import serve`` for ``from ray import serve``.

It exercises what the Core issue lists: deployments (class and function), composition,
options, errors, status, delete, redeploy and user_config. Run: ``python examples/ray_compat.py``.
"""

import asyncio

import serve  # was: from ray import serve
from serve.exceptions import RayServeException
from serve.handle import DeploymentHandle, DeploymentResponse


@serve.deployment(num_replicas=2, max_ongoing_requests=10)
class Preprocessor:
    def __call__(self, text: str) -> str:
        return text.strip().lower()


@serve.deployment
def tokenize(text: str) -> list:
    return text.split()


@serve.deployment(user_config={"greeting": "Hello"})
class Model:
    def __init__(self, preprocessor: DeploymentHandle, tokenizer: DeploymentHandle):
        self._preprocessor = preprocessor
        self._tokenizer = tokenizer
        self._greeting = "?"

    def reconfigure(self, config: dict) -> None:
        self._greeting = config["greeting"]

    async def __call__(self, text: str) -> str:
        cleaned: DeploymentResponse = self._preprocessor.remote(text)
        tokens = await self._tokenizer.remote(cleaned)  # a response passed straight on
        return f"{self._greeting}, {' '.join(tokens)}!"

    async def count(self, text: str) -> int:
        return len(await self._tokenizer.remote(text))

    def fail(self) -> None:
        raise ValueError("bad input")


app = Model.bind(Preprocessor.bind(), tokenize.bind())
handle: DeploymentHandle = serve.run(app, name="nlp", route_prefix="/nlp")
assert handle.remote("  Big WORLD ").result() == "Hello, big world!"
assert handle.count.remote("a b c").result() == 3
assert handle.options(method_name="count").remote("a b").result() == 2


async def concurrently() -> list:
    return await asyncio.gather(*[handle.remote(f"x{i}") for i in range(10)])


assert len(asyncio.run(concurrently())) == 10

try:
    handle.fail.remote().result()
except ValueError as error:
    assert str(error) == "bad input"
else:
    raise AssertionError("expected ValueError")

try:
    handle.missing.remote().result()
except RayServeException as error:
    assert "Available methods" in str(error)

status = serve.status()
assert status.applications["nlp"].status == "RUNNING"
assert status.applications["nlp"].deployments["Preprocessor"].replica_states["RUNNING"] == 2

# user_config only: the live replica is reconfigured in place.
hi = Model.options(user_config={"greeting": "Hi"})
serve.run(hi.bind(Preprocessor.bind(), tokenize.bind()), name="nlp")
assert handle.remote("there").result() == "Hi, there!"


# New code: replicas are replaced and the existing handle follows.
@serve.deployment(name="Model")
class ModelV2:
    def __call__(self, text: str) -> str:
        return f"v2:{text}"


serve.run(ModelV2.bind(), name="nlp")
assert handle.remote("x").result() == "v2:x"
assert serve.get_app_handle("nlp").remote("y").result() == "v2:y"

serve.delete("nlp")
assert "nlp" not in serve.status().applications
serve.shutdown()
print("ray-compatible program OK")
