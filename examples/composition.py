"""Composing deployments: handles passed to constructors, responses passed along without waiting,
methods by name, handles looked up later, a call to every replica, and choosing a replica
before sending. Run it: ``python examples/composition.py``.
"""

import asyncio

import serve
from serve.handle import DeploymentHandle, DeploymentResponse

# --8<-- [start:graph]


@serve.deployment
class Tokenizer:
    def __call__(self, text: str) -> list[str]:
        return text.lower().split()


@serve.deployment(num_replicas=2)
class Counter:
    def count(self, words: list[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for word in words:
            counts[word] = counts.get(word, 0) + 1
        return counts

    def top(self, counts: dict[str, int]) -> str:
        return max(counts, key=lambda word: counts[word])


@serve.deployment
class WordStats:
    def __init__(self, tokenizer: DeploymentHandle, counter: DeploymentHandle) -> None:
        self.tokenizer = tokenizer  # bound applications arrive as handles
        self.counter = counter

    async def __call__(self, text: str) -> str:
        words: DeploymentResponse = self.tokenizer.remote(text)  # sent now, not awaited
        counts = self.counter.count.remote(words)  # waits for `words` itself, in the router
        return await self.counter.top.remote(counts)


app = WordStats.bind(Tokenizer.bind(), Counter.bind())
stats: DeploymentHandle = serve.run(app, name="stats")
assert stats.remote("the cat saw the dog").result() == "the"  # from sync code
# --8<-- [end:graph]

# --8<-- [start:async]


async def main() -> list[str]:
    # From async code, await the responses; many can be in flight at once.
    texts = ["a b a", "x y y", "p q q q"]
    return await asyncio.gather(*(stats.remote(t) for t in texts))


assert asyncio.run(main()) == ["a", "y", "q"]
# --8<-- [end:async]

# --8<-- [start:lookup]
handle = serve.get_app_handle("stats")  # the ingress of an application already running
counter = serve.get_deployment_handle("Counter", app_name="stats")
assert counter.count.remote(["b", "b"]).result() == {"b": 2}
assert counter.options(method_name="top").remote({"k": 1}).result() == "k"
# --8<-- [end:lookup]

# --8<-- [start:broadcast]
counts = counter.broadcast("count", ["hello"]).results()  # one call per running replica
assert counts == [{"hello": 1}, {"hello": 1}]
# --8<-- [end:broadcast]

# --8<-- [start:choose]


async def pinned() -> tuple[str, dict[str, int]]:
    # Pick the replica first (it holds a slot for us), then send the request to it.
    async with counter.choose_replica() as selection:
        replica = selection.replica_id  # also node_id, node_ip, port
        result = await counter.options(method_name="count").dispatch(selection, ["x"])
    return replica, result


replica_id, result = asyncio.run(pinned())
assert result == {"x": 1}
print("sent to the chosen replica:", bool(replica_id))
# --8<-- [end:choose]

serve.shutdown()
print("composition example OK")
