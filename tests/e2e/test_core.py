"""Core behaviour through real daemons: deployments, handles, responses, composition, errors."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import time
from typing import Any

import pytest

import serve
from serve.exceptions import (
    DeploymentFailedError,
    DeploymentUnavailableError,
    RemoteError,
    RemoteTraceback,
    RequestCancelledError,
    ServeError,
)
from serve.handle import DeploymentHandle, DeploymentResponse
from tests.support.apps import Recorder, Signal
from tests.support.procs import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


@serve.deployment
class Echo:
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return args, kwargs

    async def upper(self, text: str) -> str:
        return text.upper()

    def pid(self) -> int:
        return os.getpid()


@serve.deployment
def double(x: int) -> int:
    return 2 * x


def test_class_and_function_deployments() -> None:
    echo = serve.run(Echo.bind(), name="echo", route_prefix=None)
    assert echo.remote(1, "a", k=2).result() == ((1, "a"), {"k": 2})
    fn = serve.run(double.bind(), name="fn")
    assert fn.remote(21).result() == 42


def test_methods_by_attribute_and_by_options() -> None:
    h = serve.run(Echo.bind(), name="methods")
    assert h.upper.remote("hi").result() == "HI"
    assert h.options(method_name="upper").remote("yo").result() == "YO"
    assert h.remote("plain").result() == (("plain",), {})  # the original handle is unchanged


def test_unknown_method_names_it_and_lists_the_available_ones() -> None:
    h = serve.run(Echo.bind(), name="unknown")
    with pytest.raises(ServeError) as info:
        h.does_not_exist.remote().result()
    text = str(info.value)
    assert "'does_not_exist'" in text
    assert "Available methods: ['__call__', 'pid', 'upper']" in text


def test_response_can_be_read_many_times() -> None:
    h = serve.run(Echo.bind(), name="many")
    response = h.upper.remote("x")
    assert isinstance(response, DeploymentResponse)
    assert [response.result() for _ in range(5)] == ["X"] * 5

    async def await_many() -> list[str]:
        return [await response for _ in range(5)]

    assert asyncio.run(await_many()) == ["X"] * 5


def test_requests_run_eagerly_without_being_awaited() -> None:
    recorder = serve.run(Recorder.bind(), name="eager")
    recorder.add.remote("sent")  # never awaited
    wait_for(lambda: recorder.count.remote("sent").result() == 1)


def test_result_timeout_does_not_cancel_and_result_can_be_retried() -> None:
    signal = serve.run(Signal.bind(), name="signal")
    response = signal.wait.remote()
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.1)
    assert not response.cancelled()
    signal.send.remote().result()
    assert response.result(timeout_s=10) is None


def test_result_inside_a_running_loop_tells_the_user_to_await() -> None:
    h = serve.run(Echo.bind(), name="inloop")

    async def main() -> None:
        response = h.upper.remote("a")
        with pytest.raises(RuntimeError, match="Use `await response` instead"):
            response.result()
        assert await response == "A"

    asyncio.run(main())


def test_one_handle_from_many_threads_and_loops() -> None:
    h = serve.run(Echo.bind(), name="threads")
    results: list[str] = []
    errors: list[BaseException] = []

    def sync_worker(i: int) -> None:
        try:
            results.append(h.upper.remote(f"s{i}").result(timeout_s=30))
        except BaseException as exc:
            errors.append(exc)

    def loop_worker(i: int) -> None:
        async def main() -> str:
            return await h.upper.remote(f"a{i}")

        try:
            results.append(asyncio.run(main()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync_worker, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=loop_worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(results) == sorted([f"S{i}" for i in range(8)] + [f"A{i}" for i in range(8)])


def test_response_created_in_one_loop_awaited_in_another() -> None:
    h = serve.run(Echo.bind(), name="crossloop")

    async def make() -> DeploymentResponse[str]:
        return h.upper.remote("z")

    response = asyncio.run(make())
    assert asyncio.run(_await(response)) == "Z"


async def _await(response: Any) -> Any:
    return await response


@serve.deployment
class Adder:
    def __init__(self, tag: str) -> None:
        self._tag = tag

    def __call__(self, *parts: Any, **named: Any) -> str:
        return "|".join(
            [*map(str, parts), *(f"{k}={v}" for k, v in sorted(named.items())), self._tag]
        )


def test_responses_as_args_and_kwargs_are_resolved() -> None:
    h = serve.run(Adder.bind("t"), name="compose")
    first = h.remote("a")
    second = h.remote(first, "b", x=h.remote("c"))
    assert second.result() == "a|t|b|x=c|t|t"


@serve.deployment
class Chain:
    def __init__(self, factor: int) -> None:
        self._factor = factor

    async def __call__(self, value: int) -> int:
        await asyncio.sleep(0.05)
        return value * self._factor


@pytest.mark.parametrize("order", ["b_first", "c_first"])
def test_chained_responses_in_any_await_order(order: str) -> None:
    a = serve.run(Chain.bind(2), name="chain")
    r1 = a.remote(3)
    r2 = a.remote(r1)
    r3 = a.remote(r2)

    async def main() -> tuple[int, int]:
        if order == "b_first":
            b = await r2
            c = await r3
        else:
            c = await r3
            b = await r2
        return b, c

    assert asyncio.run(main()) == (12, 24)


@serve.deployment
class Fails:
    def __call__(self, message: str) -> None:
        raise ValueError(message)

    def ok(self, value: Any) -> Any:
        return value


def test_upstream_error_fails_the_downstream_call_with_that_error() -> None:
    h = serve.run(Fails.bind(), name="upstream")
    downstream = h.ok.remote(h.remote("upstream broke"))
    with pytest.raises(ValueError, match="upstream broke"):
        downstream.result()
    assert h.ok.remote(5).result() == 5


def test_nested_response_is_refused_with_a_clear_error() -> None:
    h = serve.run(Echo.bind(), name="nested")
    with pytest.raises(ServeError, match="`DeploymentResponse` is not serializable"):
        h.remote([h.upper.remote("x")]).result()
    with pytest.raises(ServeError, match="not serializable"):
        pickle.dumps(h.upper.remote("x"))


def test_one_response_feeds_several_calls() -> None:
    signal = serve.run(Signal.bind(), name="sig2", route_prefix=None)
    h = serve.run(Adder.bind("t"), name="fanout")
    gate = signal.wait.remote()
    upstream = h.remote("r1", gate)
    a = h.remote(upstream)
    b = h.remote(upstream)
    signal.send.remote().result()
    assert (a.result(timeout_s=10), b.result(timeout_s=10)) == ("r1|None|t|t", "r1|None|t|t")


class CustomError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("cannot travel")
        self.lock = threading.Lock()


@serve.deployment
class Raiser:
    def custom(self) -> None:
        raise CustomError(7, "seven")

    async def unpicklable(self) -> None:
        raise Unpicklable()


def test_user_exceptions_keep_their_type_and_remote_traceback() -> None:
    h = serve.run(Raiser.bind(), name="raiser")
    with pytest.raises(CustomError) as info:
        h.custom.remote().result()
    assert info.value.code == 7
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert 'raise CustomError(7, "seven")' in cause.traceback
    assert "in custom" in cause.traceback


def test_an_exception_that_cannot_be_rebuilt_arrives_as_remote_error() -> None:
    h = serve.run(Raiser.bind(), name="raiser2")
    with pytest.raises(RemoteError) as info:
        h.unpicklable.remote().result()
    assert info.value.type_name.endswith("Unpicklable")
    assert "cannot travel" in info.value.message
    assert "in unpicklable" in info.value.traceback


@serve.deployment(max_ongoing_requests=1)
class Gate:
    def __init__(self, signal: DeploymentHandle[Any], recorder: DeploymentHandle[Any]) -> None:
        self._signal = signal
        self._recorder = recorder

    async def __call__(self, tag: str) -> str:
        await self._recorder.add.remote(f"start:{tag}")
        try:
            await self._signal.wait.remote()
        except asyncio.CancelledError:
            await self._recorder.add.remote(f"cancelled:{tag}")
            raise
        return tag


def test_cancel_while_queued_never_reaches_the_replica() -> None:
    gate = serve.run(Gate.bind(Signal.bind(), Recorder.bind()), name="gate", route_prefix=None)
    recorder = serve.get_deployment_handle("Recorder", "gate")
    signal = serve.get_deployment_handle("Signal", "gate")
    first = gate.remote("first")
    wait_for(lambda: recorder.count.remote("start:first").result() == 1)
    queued = gate.remote("queued")  # max_ongoing_requests=1: waits in the handle
    queued.cancel()
    assert queued.cancelled()
    with pytest.raises(RequestCancelledError):
        queued.result(timeout_s=10)
    signal.send.remote().result()
    assert first.result(timeout_s=10) == "first"
    assert gate.remote("after").result(timeout_s=10) == "after"
    assert "start:queued" not in recorder.events.remote().result()


def test_cancel_during_execution_cancels_the_user_coroutine() -> None:
    gate = serve.run(Gate.bind(Signal.bind(), Recorder.bind()), name="gate2", route_prefix=None)
    recorder = serve.get_deployment_handle("Recorder", "gate2")
    running = gate.remote("running")
    wait_for(lambda: recorder.count.remote("start:running").result() == 1)
    signal = serve.get_deployment_handle("Signal", "gate2")
    wait_for(lambda: signal.num_waiters.remote().result() == 1)
    running.cancel()
    with pytest.raises(RequestCancelledError):
        running.result(timeout_s=10)
    wait_for(lambda: recorder.count.remote("cancelled:running").result() == 1)
    # The child request the cancelled one was waiting on was cancelled too.
    wait_for(lambda: signal.num_waiters.remote().result() == 0)
    # The slot was released: the next request runs.
    signal.send.remote().result()
    assert gate.remote("next").result(timeout_s=10) == "next"


@serve.deployment
class Forwarder:
    async def __call__(self, handle: DeploymentHandle[Any], text: str) -> str:
        return await handle.upper.remote(text)


def test_handles_are_picklable_and_can_be_passed_in_requests() -> None:
    echo = serve.run(Echo.bind(), name="target", route_prefix=None)
    restored = pickle.loads(pickle.dumps(echo.upper))
    assert restored.upper.remote("p").result() == "P"
    forwarder = serve.run(Forwarder.bind(), name="forwarder")
    assert forwarder.remote(echo, "q").result() == "Q"


def test_get_app_and_deployment_handles_are_cached() -> None:
    serve.run(Adder.bind("t"), name="lookup")
    app_handle = serve.get_app_handle("lookup")
    assert app_handle is serve.get_app_handle("lookup")
    assert app_handle.remote("x").result() == "x|t"
    dep_handle = serve.get_deployment_handle("Adder", "lookup")
    assert dep_handle is serve.get_deployment_handle("Adder", "lookup")
    with pytest.raises(ServeError, match="does not exist"):
        serve.get_app_handle("no-such-app")
    with pytest.raises(ServeError, match="does not exist in application 'lookup'"):
        serve.get_deployment_handle("Nope", "lookup")
    with pytest.raises(ServeError, match="needs app_name outside a deployment"):
        serve.get_deployment_handle("Adder")


def test_replica_context_outside_a_deployment_raises() -> None:
    with pytest.raises(ServeError, match="only be called from within a serve deployment"):
        serve.get_replica_context()


@serve.deployment
class Composite:
    def __init__(self, adder: DeploymentHandle[Any]) -> None:
        self._adder = adder
        self._own = serve.get_deployment_handle("Adder")

    async def __call__(self) -> dict[str, Any]:
        context = serve.get_replica_context()
        return {
            "app": context.app_name,
            "deployment": context.deployment,
            "tag": context.replica_tag,
            "id": context.replica_id.unique_id,
            "servable": type(context.servable_object).__name__,
            "bound": await self._adder.remote("b"),
            "looked_up": await self._own.remote("l"),
        }


def test_replica_context_inside_a_deployment() -> None:
    h = serve.run(Composite.bind(Adder.bind("t")), name="inside")
    info = h.remote().result(timeout_s=30)
    assert info["app"] == "inside"
    assert info["deployment"] == "Composite"
    assert info["tag"] == info["id"]
    assert len(info["id"]) == 8
    assert info["servable"] == "Composite"
    assert (info["bound"], info["looked_up"]) == ("b|t", "l|t")


@serve.deployment(version="1")  # as Ray: a kept version makes config changes in place
class Versioned:
    def __init__(self) -> None:
        self._config: Any = None

    def reconfigure(self, config: Any) -> None:
        self._config = config

    def __call__(self) -> tuple[int, Any]:
        return os.getpid(), self._config


def test_user_config_change_reconfigures_live_replicas_without_restart() -> None:
    h = serve.run(Versioned.options(user_config={"v": 1}).bind(), name="userconfig")
    pid, config = h.remote().result()
    assert config == {"v": 1}
    h2 = serve.run(Versioned.options(user_config={"v": 2}).bind(), name="userconfig")
    assert h2 is h
    assert h.remote().result() == (pid, {"v": 2})


def test_new_code_replaces_replicas_and_existing_handles_follow() -> None:
    h = serve.run(Echo.bind(), name="redeploy")
    old_pid = h.pid.remote().result()

    @serve.deployment(name="Echo")
    class EchoV2:
        def pid(self) -> int:
            return os.getpid()

        def version(self) -> int:
            return 2

    serve.run(EchoV2.bind(), name="redeploy")
    assert h.version.remote().result(timeout_s=30) == 2
    assert h.pid.remote().result() != old_pid


@serve.deployment
class BrokenInit:
    def __init__(self) -> None:
        raise ValueError("constructor says no")


def test_failing_constructor_makes_run_raise_with_the_users_traceback() -> None:
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(BrokenInit.bind(), name="broken")
    text = str(info.value)
    assert "constructor says no" in text
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, ValueError)
    cause_tb = info.value.__cause__.__cause__
    assert isinstance(cause_tb, RemoteTraceback)
    assert "in __init__" in cause_tb.traceback
    assert serve.status().applications["broken"].status == "DEPLOY_FAILED"


@serve.deployment(num_replicas=2, max_constructor_retry_count=2)
class FailsAsSecond:
    def __init__(self) -> None:
        context = serve.get_replica_context()
        if context.rank == 1:  # the first replica runs; every second one fails
            raise RuntimeError("rank 1 cannot start")

    def __call__(self) -> str:
        return "serving"


def test_a_version_that_ran_is_unhealthy_and_backs_off_when_starts_keep_failing() -> None:
    """Past the limit (min(2 * 3, max_constructor_retry_count=2)) a version that ran is not a
    failed deploy: Ray's UNHEALTHY, its message with the last error, and starts back off."""
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(FailsAsSecond.bind(), name="half")
    text = str(info.value)
    assert "failed to start 2 times in a row" in text
    assert "Retrying after 1 seconds" in text
    assert "rank 1 cannot start" in text
    assert serve.status().applications["half"].status == "UNHEALTHY"

    def backed_off_further() -> bool:
        message = serve.status().applications["half"].deployments["FailsAsSecond"].message
        return "Retrying after 2 seconds" in message

    wait_for(backed_off_further, timeout_s=30, interval_s=0.2)
    assert serve.get_app_handle("half").remote().result(timeout_s=10) == "serving"  # one does
    serve.delete("half")


@serve.deployment
class AsyncInit:
    async def __init__(self, value: int) -> None:  # type: ignore[misc]
        await asyncio.sleep(0.01)
        self.value = value
        self.task = asyncio.get_running_loop().create_task(asyncio.sleep(0))

    def __call__(self) -> int:
        return self.value


def test_async_constructor() -> None:
    assert serve.run(AsyncInit.bind(5), name="asyncinit").remote().result() == 5


def test_delete_removes_the_application() -> None:
    h = serve.run(Echo.bind(), name="todelete")
    assert h.upper.remote("a").result() == "A"
    serve.delete("todelete")
    assert "todelete" not in serve.status().applications
    with pytest.raises(DeploymentUnavailableError, match=r"todelete\.Echo"):
        h.upper.remote("a").result(timeout_s=10)


def test_status_has_rays_shape() -> None:
    serve.run(Adder.options(num_replicas=2).bind("t"), name="shape")
    status = serve.status()
    app = status.applications["shape"]
    assert app.status == "RUNNING"
    assert isinstance(app.last_deployed_time_s, float)
    deployment = app.deployments["Adder"]
    assert deployment.status == "HEALTHY"
    assert deployment.replica_states == {"RUNNING": 2}
    assert next(iter(deployment.replica_states)) == "RUNNING"  # a str enum


@serve.deployment(max_ongoing_requests=2)
class Tracker:
    def __init__(self) -> None:
        self._now = 0
        self._peak = 0

    async def __call__(self) -> None:
        self._now += 1
        self._peak = max(self._peak, self._now)
        await asyncio.sleep(0.02)
        self._now -= 1

    def peak(self) -> int:
        return self._peak

    def blocking(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


def test_max_ongoing_requests_bounds_concurrency_in_the_replica() -> None:
    h = serve.run(Tracker.bind(), name="limit")
    responses = [h.remote() for _ in range(20)]
    for r in responses:
        r.result(timeout_s=30)
    assert h.peak.remote().result() == 2


def test_sync_methods_run_off_the_event_loop() -> None:
    h = serve.run(Tracker.options(max_ongoing_requests=4).bind(), name="sync")
    slow = h.blocking.remote(1.0)
    started = time.monotonic()
    assert h.peak.remote().result(timeout_s=10) == 0
    assert time.monotonic() - started < 0.9
    assert slow.result(timeout_s=10) == 1.0


def test_handle_copies_share_one_router_and_init_is_once_and_first() -> None:
    h = serve.run(Echo.bind(), name="router")
    copy = h.options(multiplexed_model_id="m")
    assert copy._router is h._router
    assert h.upper._router is h._router
    assert h.handle_options.method_name == "__call__"
    with pytest.raises(RuntimeError, match="already initialized"):
        h._init(_prefer_local_routing=True)
    fresh: DeploymentHandle[Any] = DeploymentHandle("Echo", "router")
    fresh._init(_prefer_local_routing=True)
    assert fresh.is_initialized
    with pytest.raises(RuntimeError, match="already initialized"):
        fresh._init()
    assert fresh.upper.remote("i").result() == "I"
    with pytest.raises(AttributeError):
        fresh._private_name  # noqa: B018
