"""Ray 2.60's ingress surface through real daemons: backpressure answers (BackpressureConfig),
HTTPS (HTTPOptions' ssl_* fields), and /-/healthz before any application is exposed."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.requests import Request

import serve
import serve.exceptions
from serve.config import BackpressureConfig, HTTPOptions
from tests.support.ingress import MODE_ENV, Ingress
from tests.support.procs import PROXY_ARGS, StandaloneController, answers, run_script, wait_for
from tests.support.tls import make_certs

pytestmark = pytest.mark.e2e


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Gate:
    """Holds each request until the test opens the gate (a file)."""

    def __init__(self, gate: str) -> None:
        self.gate = Path(gate)

    async def __call__(self, request: Request) -> str:
        while not self.gate.exists():  # noqa: ASYNC110 - the test opens it from outside
            await asyncio.sleep(0.02)
        return "through"


def _fill(url: str, client: httpx.AsyncClient) -> tuple[asyncio.Task[httpx.Response], ...]:
    """One request running and one queued: the next one is dropped."""
    return tuple(asyncio.ensure_future(client.get(url)) for _ in range(2))


async def _dropped(url: str, gate: Path) -> tuple[httpx.Response, list[int]]:
    async with httpx.AsyncClient(timeout=30) as client:
        held = _fill(url, client)
        await asyncio.sleep(0.5)  # both reached the proxy's queue
        dropped = await client.get(url)
        gate.touch()  # noqa: ASYNC240 - a test marker
        statuses = [r.status_code for r in await asyncio.gather(*held)]
    return dropped, statuses


def test_backpressure_config_sets_the_status_and_retry_after(
    ingress: Ingress, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    app = Gate.options(
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=2.5)
    ).bind(str(gate))
    serve.run(app, name="shed", route_prefix="/shed")
    dropped, held = asyncio.run(_dropped(ingress.url("/shed"), gate))
    assert held == [200, 200]
    assert dropped.status_code == 429
    assert dropped.headers["retry-after"] == "3"  # rounded up to whole seconds
    assert dropped.text.startswith("Request dropped due to backpressure")


def test_backpressure_defaults_to_503_without_retry_after(ingress: Ingress, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    serve.run(Gate.bind(str(gate)), name="shed", route_prefix="/shed")
    dropped, held = asyncio.run(_dropped(ingress.url("/shed"), gate))
    assert held == [200, 200]
    assert dropped.status_code == 503
    assert "retry-after" not in dropped.headers


def test_backpressure_config_is_validated_as_ray_validates_it() -> None:
    with pytest.raises(ValueError, match="503 or 429"):
        BackpressureConfig(status_code=500)
    with pytest.raises(ValueError, match="retry_after_s"):
        BackpressureConfig(retry_after_s=-1)
    with pytest.raises(ValueError, match="retry_after_s"):
        BackpressureConfig(retry_after_s=float("inf"))
    with pytest.raises(ValueError, match="retry_after"):  # a typo is refused, not dropped
        Gate.options(backpressure_config={"retry_after": 5})
    assert Gate.options(backpressure_config={"status_code": 429}) is not None


# HTTPS.


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "certs"
    directory.mkdir()
    files = make_certs(directory)
    return {
        "key": files["SERVE_TLS_KEY"],
        "cert": files["SERVE_TLS_CERT"],
        "ca": files["SERVE_TLS_CA"],
    }


def _encrypted_copy(key: str, password: str) -> str:
    out = f"{key}.enc"
    subprocess.run(
        ["openssl", "rsa", "-aes256", "-in", key, "-out", out, "-passout", f"pass:{password}"],
        check=True,
        capture_output=True,
    )
    return out


DRIVER = """
import serve
from starlette.requests import Request

@serve.deployment
class Hello:
    def __call__(self, request: Request) -> str:
        return f"hello over {request.url.scheme}"

serve.run(Hello.bind(), name="hello", route_prefix="/")
"""


@pytest.fixture(params=["proxy", "haproxy"])
def https_controller(
    request: pytest.FixtureRequest, tmp_path: Path, certs: dict[str, str]
) -> Iterator[StandaloneController]:
    """HTTPS from the proxy (a key with a password) or from HAProxy in front of the ingress
    replicas, which serve HTTPS too (HAProxy reads no password: its key has none)."""
    if request.param == "proxy":
        key = _encrypted_copy(certs["key"], "s3cret")
        env = {"SERVE_HTTP_SSL_KEYFILE_PASSWORD": "s3cret"}  # never on a command line
    else:
        key, env = certs["key"], MODE_ENV["haproxy"]
    controller = StandaloneController(
        tmp_path / "state",
        *PROXY_ARGS,
        "--http-ssl-keyfile",
        key,
        "--http-ssl-certfile",
        certs["cert"],
        **env,
    )
    try:
        controller.start()
        deployed = run_script(DRIVER, env=controller.driver_env())
        assert deployed.returncode == 0, deployed.stderr
        yield controller
    finally:
        controller.cleanup()


def test_https(https_controller: StandaloneController, certs: dict[str, str]) -> None:
    address = https_controller.healthy_proxy()["http_address"]
    trust = ssl.create_default_context(cafile=certs["ca"])
    wait_for(
        lambda: answers(f"https://{address}/", "hello over https", verify=trust),
        timeout_s=30,
        interval_s=0.1,
    )
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
        httpx.get(f"http://{address}/", timeout=10)
    # The password is in no process's command line.
    for pid in https_controller.proxy_pids():
        assert "s3cret" not in " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode())


def test_https_options_are_checked() -> None:
    with pytest.raises(ValueError, match="ssl_keyfile and ssl_certfile must be provided together"):
        HTTPOptions(ssl_keyfile="key.pem")
    with pytest.raises(ValueError, match="ssl_keyfile and ssl_certfile must be provided together"):
        serve.start(http_options={"ssl_certfile": "cert.pem"})


def _unhealthy_message(state: Path, key: str, cert: str, **env: str) -> str:
    """Why the proxy of a controller started with this key and certificate is UNHEALTHY."""
    controller = StandaloneController(
        state,
        *PROXY_ARGS,
        "--http-ssl-keyfile",
        key,
        "--http-ssl-certfile",
        cert,
        **env,
    )
    try:
        controller.start()

        def unhealthy() -> str:
            proxies = list(controller.status()["proxies"].values())
            return proxies[0]["message"] if proxies and proxies[0]["status"] == "UNHEALTHY" else ""

        message: str = wait_for(unhealthy, timeout_s=30, interval_s=0.2)
        return message
    finally:
        controller.cleanup()


def test_a_bad_key_is_reported_in_status(tmp_path: Path, certs: dict[str, str]) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    message = _unhealthy_message(tmp_path / "state", str(bad), certs["cert"])
    assert "cannot serve HTTPS" in message


def test_haproxy_refuses_a_password_protected_key(tmp_path: Path, certs: dict[str, str]) -> None:
    key = _encrypted_copy(certs["key"], "s3cret")
    env = {"SERVE_HTTP_SSL_KEYFILE_PASSWORD": "s3cret", **MODE_ENV["haproxy"]}
    message = _unhealthy_message(tmp_path / "state", key, certs["cert"], **env)
    assert "cannot use a key protected by a password" in message


# Health before any application.


@pytest.mark.parametrize("mode", ["proxy", "haproxy"])  # direct: the proxy's port is the proxy's
def test_healthz_is_503_until_an_application_is_exposed(tmp_path: Path, mode: str) -> None:
    controller = StandaloneController(tmp_path / "state", *PROXY_ARGS, **MODE_ENV[mode])
    try:
        controller.start()
        address = controller.healthy_proxy()["http_address"]  # up from the start
        early = httpx.get(f"http://{address}/-/healthz", timeout=10)
        assert (early.status_code, early.text) == (503, "Route table is not populated yet.")
        deployed = run_script(DRIVER, env=controller.driver_env())
        assert deployed.returncode == 0, deployed.stderr

        def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://{address}/-/healthz", timeout=10).text == "success"
            return False

        wait_for(healthy, timeout_s=30)
        controller.serve("delete", "hello")
        assert httpx.get(f"http://{address}/-/healthz", timeout=10).status_code == 200
    finally:
        controller.cleanup()


# FastAPI rules, as Ray's.


def test_an_ingress_app_is_frozen_when_it_decorates(ingress: Ingress) -> None:
    """Two classes decorated with one FastAPI app each serve their own routes; a route added
    to the app afterwards is served by neither; an included router (FastAPI keeps a lock in
    it) travels."""
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class First:
        @app.get("/")
        def root(self) -> str:
            return "first"

    @serve.deployment
    @serve.ingress(app)
    class Second:
        @app.get("/")
        def root(self) -> str:
            return "second"

    @app.get("/late")
    def late() -> str:
        return "late"

    serve.run(First.bind(), name="first", route_prefix="/v1")
    serve.run(Second.bind(), name="second", route_prefix="/v2")
    assert httpx.get(ingress.url("/v1"), follow_redirects=True).json() == "first"
    assert httpx.get(ingress.url("/v2"), follow_redirects=True).json() == "second"
    for prefix in ("/v1", "/v2"):
        assert httpx.get(ingress.url(f"{prefix}/late")).status_code == 404

    routed = FastAPI()
    router = APIRouter(prefix="/sub")

    @router.get("/path")
    def sub() -> str:
        return "included"

    routed.include_router(router)
    serve.run(serve.deployment(serve.ingress(routed)()).bind(), name="routed", route_prefix="/r")
    assert httpx.get(ingress.url("/r/sub/path")).json() == "included"


def test_one_fastapi_ingress_per_application(serve_instance: None) -> None:
    first, second = FastAPI(), FastAPI()

    @serve.deployment
    @serve.ingress(second)
    class Inner:
        pass

    @serve.deployment
    @serve.ingress(first)
    class Outer:
        def __init__(self, inner: object) -> None:
            self.inner = inner

    with pytest.raises(serve.exceptions.ServeError, match="Found multiple FastAPI deployments"):
        serve.run(Outer.bind(Inner.bind()), name="twice", route_prefix="/twice")


def test_ingress_misuse_is_refused_with_rays_words() -> None:
    app = FastAPI()
    with pytest.raises(ValueError, match="may not have __call__ method"):

        @serve.ingress(app)
        class Callable:
            def __call__(self) -> None:
                pass

    with pytest.raises(ValueError, match="must be used with a class"):
        serve.ingress(app)(lambda: None)


@serve.deployment
class AddOne:
    def __call__(self, a: int) -> int:
        return a + 1


def _adder_app() -> FastAPI:
    """A builder: called in the replica, its routes reach another deployment of the app."""
    from fastapi import Depends

    app = FastAPI()

    def add_one() -> object:
        return serve.get_deployment_handle("AddOne", "built")

    @app.get("/add")
    async def add(a: int, handle: object = Depends(add_one)) -> int:
        return await handle.remote(a)  # type: ignore[attr-defined]

    return app


def test_a_builder_ingress_without_a_class_takes_arguments(ingress: Ingress) -> None:
    deployment = serve.deployment(serve.ingress(_adder_app)())
    assert deployment.name == "ASGIIngressDeployment"  # Ray's name for it
    serve.run(deployment.bind(AddOne.bind()), name="built", route_prefix="/built")
    assert httpx.get(ingress.url("/built/add"), params={"a": 2}, timeout=10).json() == 3


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Busy:
    def __init__(self, gate: str) -> None:
        self.gate = Path(gate)

    async def __call__(self) -> str:
        while not self.gate.exists():  # noqa: ASYNC110 - the test opens it from outside
            await asyncio.sleep(0.02)
        return "done"


def test_a_nested_call_dropped_by_backpressure_is_answered_as_the_proxy_would(
    ingress: Ingress, tmp_path: Path
) -> None:
    """A FastAPI route whose nested call is dropped answers the child's backpressure status
    (429 and Retry-After here), not FastAPI's 500, as Ray answers it."""
    app = FastAPI()
    gate = tmp_path / "gate"

    @serve.deployment(max_ongoing_requests=10)
    @serve.ingress(app)
    class Front:
        def __init__(self, busy: object) -> None:
            self.busy = busy

        @app.get("/")
        async def root(self) -> str:
            return await self.busy.remote()  # type: ignore[attr-defined]

    busy = Busy.options(backpressure_config={"status_code": 429, "retry_after_s": 1}).bind(
        str(gate)
    )
    serve.run(Front.bind(busy), name="front", route_prefix="/front")
    dropped, held = asyncio.run(_dropped(ingress.url("/front/"), gate))
    assert held == [200, 200]
    assert (dropped.status_code, dropped.headers.get("retry-after")) == (429, "1")
    assert dropped.text.startswith("Request dropped due to backpressure")


READY_DRIVER = """
import json, sys
import grpc, httpx
import serve
from serve.generated import serve_pb2, serve_pb2_grpc
from tests.support.greeter_pb2 import HelloReply

serve.start(
    proxy_location="EveryNode",
    http_options={"port": 0},
    grpc_options={"port": 0, "grpc_servicer_functions": [sys.argv[1]]},
)
# serve.start returned: the proxy serves both ports already, as Ray's does.
proxy = next(iter(serve.status().proxy_details.values()))
out = {"status": proxy.status}
stub = serve_pb2_grpc.RayServeAPIServiceStub(grpc.insecure_channel(proxy.grpc_address))
try:
    stub.Healthz(serve_pb2.HealthzRequest(), timeout=10)
except grpc.RpcError as error:
    out["grpc_before"] = [error.code().name, error.details()]

@serve.deployment
class GrpcOnly:
    def SayHello(self, request):
        return HelloReply(message="hi")

serve.run(GrpcOnly.bind(), name="grpc-only", route_prefix=None)
out["grpc_after"] = stub.Healthz(serve_pb2.HealthzRequest(), timeout=10).message
out["http_after"] = httpx.get(f"http://{proxy.http_address}/-/healthz", timeout=10).status_code
print(json.dumps(out))
serve.shutdown()
"""


@pytest.mark.parametrize("mode", ["proxy", "haproxy"])
def test_serve_start_returns_once_the_proxy_serves(tmp_path: Path, mode: str) -> None:
    import json

    from tests.conftest import GREETER_SERVICER

    result = run_script(
        f"import sys; sys.argv = ['driver', {GREETER_SERVICER!r}]\n" + READY_DRIVER,
        timeout_s=120,
        env={"SERVE_STATE_DIR": str(tmp_path / "state"), **MODE_ENV[mode]},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == "HEALTHY"
    assert out["grpc_before"] == ["UNAVAILABLE", "Route table is not populated yet."]
    # An application without a route prefix is served over gRPC, not HTTP (as Ray's).
    assert out["grpc_after"] == "success"
    assert out["http_after"] == 503
