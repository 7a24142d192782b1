"""What re-running Ray Serve's own test files here found, each as Ray behaves, through real daemons
(and the shared HTTP proxy where Ray's test goes through HTTP)."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import serve
from serve.exceptions import DeploymentFailedError, DeploymentUnavailableError, ServeError
from serve.handle import DeploymentHandle, DeploymentResponse
from tests.support.ingress import Ingress

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]


def test_an_http_handler_without_parameters_is_called_without_the_request(ingress: Ingress) -> None:
    @serve.deployment
    def hello() -> str:
        return "hi"

    @serve.deployment
    class Plain:
        async def __call__(self) -> dict[str, int]:
            return {"answer": 42}

    serve.run(hello.bind(), name="no-params", route_prefix="/no-params")
    serve.run(Plain.bind(), name="no-params-class", route_prefix="/no-params-class")
    assert httpx.get(ingress.url("/no-params"), timeout=10).text == "hi"
    assert httpx.get(ingress.url("/no-params-class"), timeout=10).json() == {"answer": 42}


@serve.deployment
def pid() -> int:
    return os.getpid()


@serve.deployment(version="1", user_config={"greeting": "Hello"})
class Versioned:
    def __init__(self) -> None:
        self.greeting = ""

    def reconfigure(self, config: dict[str, str]) -> None:
        self.greeting = config["greeting"]

    def __call__(self) -> tuple[str, int]:
        return self.greeting, os.getpid()


def test_serve_run_again_replaces_replicas_unless_a_version_is_kept() -> None:
    first = serve.run(pid.bind(), name="redeploy").remote().result()
    second = serve.run(pid.bind(), name="redeploy").remote().result()
    assert first != second  # as Ray: same code, no version, new replicas

    versioned = serve.run(Versioned.bind(), name="versioned", route_prefix=None)
    greeting, kept = versioned.remote().result()
    assert greeting == "Hello"
    changed = Versioned.options(user_config={"greeting": "Howdy"}).bind()
    again = serve.run(changed, name="versioned", route_prefix=None)
    assert again.remote().result() == ("Howdy", kept)


def test_requests_to_a_deployment_that_failed_to_deploy_fail_at_once(ingress: Ingress) -> None:
    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            _ = 1 / 0

    with pytest.raises(DeploymentFailedError, match="ZeroDivisionError"):
        serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    started = time.monotonic()
    handle = serve.get_app_handle("broken")
    with pytest.raises(DeploymentUnavailableError, match="ZeroDivisionError"):
        handle.remote().result(timeout_s=10)
    if ingress.mode == "direct":
        return  # no replica runs: nothing listens for the application but the proxy
    # HAProxy: no replica is up, so the proxy behind it answers.
    reply = httpx.post(ingress.url("/broken", replicas=False), timeout=10)
    assert reply.status_code == 503
    assert "unavailable" in reply.text
    assert time.monotonic() - started < 5  # answered, not left waiting for replicas


def test_a_health_check_failing_from_the_start_makes_the_deployment_unhealthy() -> None:
    @serve.deployment
    class AlwaysUnhealthy:
        def check_health(self) -> None:
            raise RuntimeError("intended to fail")

        def __call__(self) -> str:
            return "never"

    with pytest.raises(RuntimeError, match="intended to fail"):
        serve.run(AlwaysUnhealthy.bind(), name="unhealthy")
    app = serve.status().applications["unhealthy"]
    assert app.status == "UNHEALTHY"
    assert app.deployments["AlwaysUnhealthy"].status == "UNHEALTHY"


def test_a_fastapi_ingress_class_defined_in_a_function_binds_self(ingress: Ingress) -> None:
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Echo:
        def __init__(self) -> None:
            self.prefix = "echo:"

        @app.post("/")
        async def echo(self, value: int) -> str:
            return f"{self.prefix}{value}"

    serve.run(Echo.bind(), name="local-ingress", route_prefix="/local-ingress")
    reply = httpx.post(ingress.url("/local-ingress/"), params={"value": 7}, timeout=10)
    assert (reply.status_code, reply.json()) == (200, "echo:7")


def test_run_many_deploys_several_applications_and_redeploys_one() -> None:
    @serve.deployment
    class A:
        def __call__(self) -> tuple[str, int]:
            return "a", os.getpid()

    @serve.deployment
    class B:
        def __call__(self) -> tuple[str, int]:
            return "b", os.getpid()

    handles = serve.run_many(
        [
            serve.RunTarget(A.bind(), name="many-a", route_prefix="/a"),
            serve.RunTarget(B.bind(), name="many-b", route_prefix="/b"),
        ]
    )
    (a, pid_a), (b, pid_b) = (h.remote().result() for h in handles)
    assert (a, b) == ("a", "b")
    serve.run_many([serve.RunTarget(B.bind(), name="many-b", route_prefix="/b")])
    assert serve.get_app_handle("many-a").remote().result() == ("a", pid_a)  # untouched
    assert serve.get_app_handle("many-b").remote().result()[1] != pid_b  # replaced
    with pytest.raises(ValueError, match="same application name twice"):
        serve.run_many([serve.RunTarget(A.bind(), name="x"), serve.RunTarget(B.bind(), name="x")])


@serve.deployment
class Up:
    def __call__(self, value: int) -> int:
        if value == 0:
            os._exit(0)
        return value + 1


@serve.deployment
class Down:
    def __call__(self, value: int) -> int:
        return value * 2


@serve.deployment
class Chain:
    def __init__(self, up: DeploymentHandle[Any], down: DeploymentHandle[Any]) -> None:
        self._up = up
        self._down = down

    async def __call__(self, value: int) -> int:
        upstream: DeploymentResponse[Any] = self._up.remote(value)
        return await self._down.remote(upstream)


def test_a_chained_call_whose_upstream_died_names_both_deployments() -> None:
    handle = serve.run(Chain.bind(Up.bind(), Down.bind()), name="chain")
    assert handle.remote(5).result(timeout_s=10) == 12
    with pytest.raises(ServeError) as raised:
        handle.remote(0).result(timeout_s=10)
    assert "Down" in str(raised.value)
    assert "Up" in str(raised.value)


def test_a_route_prefix_another_application_serves_is_refused() -> None:
    @serve.deployment
    class Model:
        def __call__(self) -> str:
            return "model"

    serve.run(Model.bind(), name="first", route_prefix="/shared")
    with pytest.raises(ServeError, match='Prefix /shared is being used by application "first"'):
        serve.run(Model.bind(), name="second", route_prefix="/shared")
    assert (
        serve.run(Model.bind(), name="second", route_prefix="/other").remote().result() == "model"
    )
    serve.delete("first")
    assert (
        serve.run(Model.bind(), name="third", route_prefix="/shared").remote().result() == "model"
    )
