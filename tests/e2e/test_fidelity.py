"""Ray behaviours a Ray Serve program relies on, through real daemons."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import serve
from serve.exceptions import RequestCancelledError
from tests.support.apps import Signal
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment("Doubler")  # the name given positionally, as Ray accepts
class _Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


@dataclasses.dataclass
class Pipeline:
    label: str
    steps: list[Any]


@serve.deployment
class Runner:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def __call__(self, x: int) -> str:
        for step in self._pipeline.steps:
            x = await step.remote(x)
        return f"{self._pipeline.label}: {x}"


def test_bound_deployments_inside_a_custom_object_arrive_as_handles() -> None:
    pipeline = Pipeline("twice doubled", [_Doubler.bind(), _Doubler.options(name="D2").bind()])
    handle = serve.run(Runner.bind(pipeline), name="custom-args")
    assert handle.remote(3).result() == "twice doubled: 12"
    status = serve.status().applications["custom-args"]
    assert sorted(status.deployments) == ["D2", "Doubler", "Runner"]


@serve.deployment
class Parent:
    def __init__(self, signal: Any) -> None:
        self._signal = signal
        self.outcome = "running"

    async def __call__(self) -> str:
        child = self._signal.wait.remote()
        try:
            await child
        except BaseException as exc:  # the user catches the cancellation and moves on
            self.outcome = type(exc).__name__
            return "caught"
        return "done"

    def seen(self) -> str:
        return self.outcome


def test_cancelling_a_request_cancels_its_children_even_if_it_catches_it() -> None:
    signal = Signal.bind()
    parent = serve.run(Parent.bind(signal), name="cancel-children")
    signal_handle = serve.get_deployment_handle("Signal", "cancel-children")
    response = parent.remote()
    wait_for(lambda: signal_handle.num_waiters.remote().result() == 1)
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=10)
    # Ray cancels the child itself: the waiter in Signal is gone even though Parent's code
    # caught the CancelledError instead of letting it propagate.
    wait_for(lambda: signal_handle.num_waiters.remote().result() == 0, timeout_s=10)


def test_runtime_env_vars_and_working_dir_reach_the_replica(tmp_path: Any) -> None:
    (tmp_path / "local_helper.py").write_text("VALUE = 'from the working_dir'\n")

    @serve.deployment(
        ray_actor_options={
            "runtime_env": {"env_vars": {"SERVE_TEST_FLAG": "on"}, "working_dir": str(tmp_path)}
        }
    )
    class Env:
        def __call__(self) -> tuple[str, str, str]:
            import os

            import local_helper  # type: ignore[import-not-found]  # found through working_dir

            return os.environ.get("SERVE_TEST_FLAG", ""), os.getcwd(), local_helper.VALUE

    flag, cwd, value = serve.run(Env.bind(), name="runtime-env").remote().result()
    assert (flag, cwd, value) == ("on", str(tmp_path), "from the working_dir")


@serve.deployment(num_replicas=2)
class Ranked:
    def __call__(self) -> tuple[int | None, int | None]:
        context = serve.get_replica_context()
        assert context.rank is not None
        assert context.rank.rank == context.rank  # Ray's ReplicaRank spelling
        return context.rank, context.world_size


def test_replicas_get_distinct_ranks_and_the_world_size() -> None:
    handle = serve.run(Ranked.bind(), name="ranks")
    seen: set[tuple[int | None, int | None]] = set()

    def both_seen() -> bool:
        seen.update(handle.remote().result() for _ in range(10))
        return len(seen) >= 2

    wait_for(both_seen, timeout_s=30)
    assert seen == {(0, 2), (1, 2)}


def test_init_on_the_handle_serve_run_returned() -> None:
    handle = serve.run(_Doubler.bind(), name="init-after-run")
    handle._init(_prefer_local_routing=True)  # as Ray allows, before the handle's first use
    assert handle.remote(4).result() == 8
