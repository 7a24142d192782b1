"""@serve.batch through real daemons: Ray's batching tests, through handles instead of HTTP.

Batches here wait long (``batch_wait_timeout_s`` of 30-60 s) and run when full, so which calls
share a batch never depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

import serve
from serve.exceptions import RayServeException
from tests.support.apps import Signal
from tests.support.procs import ROOT, python_env, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]

LONG_S = 60  # a batch that is not full waits this long: the tests fill their batches


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


# Ray: test_batching, test_batching_exception


@serve.deployment
class BatchingExample:
    def __init__(self) -> None:
        self.count = 0

    @serve.batch(max_batch_size=5, batch_wait_timeout_s=1)
    async def handle_batch(self, requests: list[int]) -> list[int]:
        self.count += 1
        return [self.count] * len(requests)

    async def __call__(self, request: int) -> int:
        return await self.handle_batch(request)


@serve.deployment
class NoListReturned:
    @serve.batch(max_batch_size=5)
    async def handle_batch(self, requests: list[int]) -> int:
        return len(requests)

    async def __call__(self, request: int) -> int:
        return await self.handle_batch(request)


def test_batching() -> None:
    handle = serve.run(BatchingExample.bind(), name="ray-batching")
    responses = [handle.remote(1) for _ in range(20)]
    assert max(r.result() for r in responses) < 20  # some batch held more than one request


def test_batching_exception() -> None:
    handle = serve.run(NoListReturned.bind(), name="ray-batching-exception")
    with pytest.raises(TypeError, match="one result per input"):
        handle.remote(1).result()


# Several arguments; a numpy result (Ray's docs example)


@serve.deployment
class Pairs:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def __call__(self, key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        return list(zip(key1, key2, strict=True))


@serve.deployment(max_ongoing_requests=8)
class Vectorized:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=LONG_S)
    async def __call__(self, samples: list[int]) -> Any:
        return np.array(samples) * 2


def test_each_argument_is_batched_into_its_own_list() -> None:
    h = serve.run(Pairs.bind(), name="batch-args")
    first, second = h.remote("hi1", key2="hi2"), h.remote(key2="hi4", key1="hi3")
    assert (first.result(), second.result()) == (("hi1", "hi2"), ("hi3", "hi4"))


def test_a_numpy_array_is_a_valid_batch_result() -> None:
    h = serve.run(Vectorized.bind(), name="batch-numpy")
    responses = [h.remote(i) for i in range(8)]
    assert [r.result() for r in responses] == [i * 2 for i in range(8)]


# Ray's docs: set_max_batch_size / set_batch_wait_timeout_s from reconfigure


@serve.deployment(version="1", user_config={"max_batch_size": 2, "batch_wait_timeout_s": LONG_S})
class Tunable:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def __call__(self, samples: list[int]) -> list[int]:
        self.sizes.append(len(samples))
        return samples

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.__call__.set_max_batch_size(user_config["max_batch_size"])
        self.__call__.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    def settings(self) -> tuple[int, float, list[int]]:
        batched = self.__call__
        return batched._get_max_batch_size(), batched._get_batch_wait_timeout_s(), self.sizes


def test_reconfigure_changes_the_batch_settings() -> None:
    h = serve.run(Tunable.bind(), name="batch-tune")
    assert [r.result() for r in [h.remote(i) for i in range(4)]] == [0, 1, 2, 3]
    assert h.settings.remote().result() == (2, LONG_S, [2, 2])

    config = {"max_batch_size": 4, "batch_wait_timeout_s": LONG_S}
    h = serve.run(Tunable.options(user_config=config).bind(), name="batch-tune")
    wait_for(lambda: h.settings.remote().result()[0] == 4)
    assert [r.result() for r in [h.remote(i) for i in range(4)]] == [0, 1, 2, 3]
    assert h.settings.remote().result()[2][-1] == 4


# Ray: test_concurrent_batching (gated by a signal instead of sleeps)


@serve.deployment(max_ongoing_requests=40)
class TwoAtATime:
    def __init__(self, signal: Any) -> None:
        self._signal = signal
        self.in_flight = 0
        self.peak = 0
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=5, batch_wait_timeout_s=LONG_S, max_concurrent_batches=2)
    async def __call__(self, requests: list[int]) -> list[int]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.sizes.append(len(requests))
        try:
            await self._signal.wait.remote()
        finally:
            self.in_flight -= 1
        return requests

    def stats(self) -> tuple[int, list[int]]:
        return self.peak, self.sizes


def test_concurrent_batching() -> None:
    h = serve.run(TwoAtATime.bind(Signal.bind()), name="batch-concurrent")
    signal = serve.get_deployment_handle("Signal", "batch-concurrent")
    responses = [h.remote(i) for i in range(20)]
    wait_for(lambda: signal.num_waiters.remote().result() == 2)
    signal.send.remote().result()
    assert [r.result() for r in responses] == list(range(20))
    assert h.stats.remote().result() == (2, [5, 5, 5, 5])


# batch_size_fn (Ray: test_batch_size_fn_graph_nodes, _deferred_item_processed,
# _oversized_item_raises_error)


class Graph:
    def __init__(self, num_nodes: int, graph_id: int) -> None:
        self.num_nodes = num_nodes
        self.graph_id = graph_id


@serve.deployment
class GraphBatcher:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    @serve.batch(
        max_batch_size=100,
        batch_wait_timeout_s=0.5,
        batch_size_fn=lambda graphs: sum(g.num_nodes for g in graphs),
    )
    async def process_graphs(self, graphs: list[Graph]) -> list[int]:
        self.batch_sizes.append(sum(g.num_nodes for g in graphs))
        return [g.graph_id * g.num_nodes for g in graphs]

    async def __call__(self, graph: Graph) -> int:
        return await self.process_graphs(graph)

    def get_batch_sizes(self) -> list[int]:
        return self.batch_sizes


def test_batch_size_fn_bounds_each_batch_and_refuses_what_cannot_fit() -> None:
    handle = serve.run(GraphBatcher.bind(), name="batch-size-fn")
    graphs = [Graph(30, 1), Graph(40, 2), Graph(35, 3), Graph(50, 4)]
    responses = [handle.remote(g) for g in graphs]
    assert [r.result() for r in responses] == [30, 80, 105, 200]
    sizes = handle.get_batch_sizes.remote().result()
    assert sum(sizes) == 155
    assert all(size <= 100 for size in sizes)
    with pytest.raises(RuntimeError, match="more than max_batch_size=100"):
        handle.remote(Graph(150, 5)).result()
    assert handle.remote(Graph(10, 6)).result() == 60


# Streaming batches (Ray's docs example and test_batch_generator_streaming_response_integration,
# through handle.options(stream=True))


@serve.deployment(max_ongoing_requests=20)
class StreamingResponder:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=5, batch_wait_timeout_s=LONG_S)
    async def generate_numbers(self, max_list: list[int]) -> AsyncIterator[list[Any]]:
        self.batch_sizes.append(len(max_list))
        for i in range(max(max_list)):
            yield [str(i) if requested > i else StopIteration for requested in max_list]
            await asyncio.sleep(0)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=LONG_S)
    async def batch_handler(self, prompts: list[str]) -> AsyncIterator[list[dict[str, str]]]:
        for _ in range(10):
            yield [{"value": prompt} for prompt in prompts]  # unhashable items are fine

    async def values(self, prompt: str) -> AsyncIterator[str]:
        async for response in self.batch_handler(prompt):
            yield response["value"]

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG_S)
    async def endless(self, ids: list[int]) -> AsyncIterator[list[int]]:
        while True:
            yield ids
            await asyncio.sleep(0.01)

    def sizes(self) -> list[int]:
        return self.batch_sizes


def test_each_caller_of_a_streaming_batch_gets_its_own_stream() -> None:
    h = serve.run(StreamingResponder.bind(), name="batch-stream").options(stream=True)
    maxes = [1, 2, 5, 6, 9]
    streams = [h.generate_numbers.remote(m) for m in maxes]
    assert [list(s) for s in streams] == [[str(i) for i in range(m)] for m in maxes]
    assert h.options(stream=False).sizes.remote().result() == [5]

    streams = [h.values.remote(f"hola{i}") for i in range(4)]
    assert ["".join(s) for s in streams] == [f"hola{i}" * 10 for i in range(4)]


def test_callers_that_leave_a_streaming_batch_do_not_stop_the_others() -> None:
    h = serve.run(StreamingResponder.bind(), name="batch-stream-drop").options(stream=True)
    streams = [h.endless.remote(i) for i in range(3)]
    assert [next(s) for s in streams] == [0, 1, 2]
    streams[0].cancel()
    streams[2].cancel()
    assert [next(streams[1]) for _ in range(5)] == [1] * 5
    streams[1].cancel()
    # Every caller has left: the batch was cancelled, and the next ones run.
    streams = [h.endless.remote(i) for i in range(3, 6)]
    assert [next(s) for s in streams] == [3, 4, 5]
    for s in streams:
        s.cancel()


# Ray: test_batching_client_dropped_unary (callers cancel instead of dropping HTTP connections)


@serve.deployment
class Droppable:
    def __init__(self, signal: Any) -> None:
        self._signal = signal
        self.cancelled = 0

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def __call__(self, values: list[str]) -> list[str]:
        try:
            if "block" in values:
                await self._signal.wait.remote()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return values

    def cancelled_batches(self) -> int:
        return self.cancelled


def test_a_batch_whose_callers_all_cancelled_is_cancelled_and_the_next_one_runs() -> None:
    h = serve.run(Droppable.bind(Signal.bind()), name="batch-dropped")
    signal = serve.get_deployment_handle("Signal", "batch-dropped")
    responses = [h.remote("block"), h.remote("block")]
    wait_for(lambda: signal.num_waiters.remote().result() == 1)
    responses[0].cancel()
    assert h.cancelled_batches.remote().result() == 0  # one caller is still there
    responses[1].cancel()
    wait_for(lambda: h.cancelled_batches.remote().result() == 1)
    assert [r.result() for r in [h.remote("a"), h.remote("b")]] == ["a", "b"]


# Multiplexing: one batch per model


@serve.deployment(max_ongoing_requests=20)
class MultiplexedBatcher:
    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str]]] = []

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        return f"model-{model_id}"

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def __call__(self, inputs: list[str]) -> list[str]:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        self.batches.append((model_id, inputs))
        return [f"{model}:{x}" for x in inputs]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
    async def stream(self, inputs: list[str]) -> AsyncIterator[list[str]]:
        model_id = serve.get_multiplexed_model_id()
        for step in range(2):
            yield [f"{model_id}:{x}:{step}" for x in inputs]

    def seen(self) -> tuple[int, list[tuple[str, list[str]]]]:
        return os.getpid(), self.batches


def test_requests_for_models_a_b_a_b_run_as_one_batch_per_model() -> None:
    h = serve.run(MultiplexedBatcher.bind(), name="batch-multiplex")
    ids = ["a", "b", "a", "b"]
    responses = [h.options(multiplexed_model_id=m).remote(f"x{n}") for n, m in enumerate(ids)]
    assert [r.result() for r in responses] == [
        "model-a:x0",
        "model-b:x1",
        "model-a:x2",
        "model-b:x3",
    ]
    _, batches = h.seen.remote().result()
    assert sorted(batches) == [("a", ["x0", "x2"]), ("b", ["x1", "x3"])]

    streams = [
        h.options(multiplexed_model_id=m, stream=True).stream.remote(f"y{n}")
        for n, m in enumerate(ids)
    ]
    assert [list(s) for s in streams] == [[f"{m}:y{n}:0", f"{m}:y{n}:1"] for n, m in enumerate(ids)]


@serve.deployment(max_ongoing_requests=100)
class ModelsSideBySide:
    def __init__(self, signal: Any) -> None:
        self._signal = signal

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG_S)  # max_concurrent_batches=1
    async def __call__(self, inputs: list[str]) -> list[str]:
        await self._signal.wait.remote()  # every model's batch holds here at once
        model_id = serve.get_multiplexed_model_id()
        return [f"{model_id}:{x}" for x in inputs]


def test_each_models_batch_runs_beside_the_other_models_batches() -> None:
    h = serve.run(ModelsSideBySide.bind(Signal.bind()), name="batch-models-concurrent")
    signal = serve.get_deployment_handle("Signal", "batch-models-concurrent")
    models = ["a", "b", "c"]
    responses = [
        h.options(multiplexed_model_id=m).remote(f"{m}{n}") for m in models for n in range(3)
    ]
    # As Ray runs the per-model sub-batches of a batch side by side: three wait at once.
    wait_for(lambda: signal.num_waiters.remote().result() == 3, timeout_s=20)
    signal.send.remote().result()
    assert [r.result(timeout_s=20) for r in responses] == [
        f"{m}:{m}{n}" for m in models for n in range(3)
    ]


@serve.deployment(max_ongoing_requests=10)
class BatchContexts:
    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG_S)
    async def __call__(self, inputs: list[int]) -> list[tuple[str, list[str]]]:
        own = serve.context._get_serve_request_context().request_id
        ids = [c.request_id for c in serve.context._get_serve_batch_request_context()]
        return [(own, ids) for _ in inputs]

    async def outside(self) -> tuple[str, list[str]]:
        context = serve.context._get_serve_request_context()
        return context.request_id, [
            c.request_id for c in serve.context._get_serve_batch_request_context()
        ]


def test_a_batch_sees_its_callers_request_contexts_as_ray_does() -> None:
    h = serve.run(BatchContexts.bind(), name="batch-contexts")
    responses = [h.remote(i) for i in range(3)]
    results = [r.result(timeout_s=20) for r in responses]
    ids = [r.request_id for r in responses]
    for own, batch_ids in results:
        assert own == ""  # as Ray: no single request is being served inside a batch
        assert sorted(batch_ids) == sorted(ids)
    request_id, batch_ids = h.outside.remote().result()
    assert request_id != ""
    assert batch_ids == []


def test_a_wrong_result_length_is_a_serve_error() -> None:
    @serve.deployment
    class Short:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG_S)
        async def __call__(self, values: list[int]) -> list[int]:
            return values[:1]

    h = serve.run(Short.bind(), name="batch-short")
    responses = [h.remote(1), h.remote(2)]
    for r in responses:
        with pytest.raises(RayServeException, match="got 2 inputs and gave 1 results"):
            r.result()


def test_the_batching_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, "examples/batching.py"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=python_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "batching guide OK" in result.stdout
