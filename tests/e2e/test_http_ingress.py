"""HTTP ingress through real daemons: a controller, its serve-proxy (uvicorn), replicas; and a
real HTTP client (httpx, a WebSocket client, a raw socket)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import websockets.sync.client
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.requests import Request

import serve
from tests.support.ingress import Ingress
from tests.support.procs import free_port, proxy_details, run_example, wait_for

pytestmark = pytest.mark.e2e

api = FastAPI()


class Item(BaseModel):
    name: str
    price: float


@serve.deployment
@serve.ingress(api)
class Shop:
    def __init__(self, greeting: str = "Hello") -> None:
        self.greeting = greeting

    @api.get("/")
    def root(self) -> str:
        return f"{self.greeting}, world!"

    @api.get("/items/{item_id}")
    async def get_item(self, item_id: int, q: str | None = None) -> dict[str, object]:
        if item_id == 404:
            raise HTTPException(status_code=404, detail="no such item")
        return {"item_id": item_id, "q": q}

    @api.post("/items")
    def create(self, item: Item) -> JSONResponse:
        return JSONResponse(
            {"created": item.name, "double": item.price * 2},
            status_code=201,
            headers={"x-shop": "yes"},
        )

    @api.get("/boom")
    def boom(self) -> None:
        raise ValueError("kaboom")

    @api.get("/stream")
    def stream(self, path: str) -> StreamingResponse:
        def chunks():  # type: ignore[no-untyped-def]
            yield "first\n"
            deadline = time.monotonic() + 20
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)
            yield "second\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.websocket("/ws")
    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"{self.greeting}: {text}")
        except WebSocketDisconnect:
            pass


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> dict[str, object]:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "body": body.decode(),
            "header": request.headers.get("x-test"),
        }


@serve.deployment
class Text:
    def __call__(self, request: Request) -> str:
        return "plain text"


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Slow:
    async def __call__(self, request: Request) -> str:
        path = request.query_params["path"]
        Path(f"{path}.started").write_text("")  # noqa: ASYNC240 - a tiny test marker
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Path(path).write_text("cancelled")  # noqa: ASYNC240
            raise
        return "done"


@serve.deployment
class Dies:
    def __call__(self, request: Request) -> str:
        os._exit(1)


@serve.deployment
class Models:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return f"model {model_id}"

    async def __call__(self, request: Request) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


@serve.deployment
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    def __call__(self, request: Request) -> str:
        return self.version


def test_plain_deployment_receives_a_starlette_request(ingress: Ingress) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    reply = httpx.post(
        ingress.url("/echo/a/b?x=1"),
        content=b"payload",
        headers={"x-test": "yes", "x-request-id": "my-id-1"},
        timeout=10,
    )
    assert reply.status_code == 200
    assert reply.headers["x-request-id"] == "my-id-1"  # the caller's id, as in Ray
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "method": "POST",
        "path": "/echo/a/b",
        "query": {"x": "1"},
        "body": "payload",
        "header": "yes",
    }
    serve.run(Text.bind(), name="text", route_prefix="/text")
    reply = httpx.get(ingress.url("/text"), timeout=10)
    assert (reply.text, reply.headers["content-type"]) == (
        "plain text",
        "text/plain; charset=utf-8",
    )


def test_the_multiplexed_model_id_header_picks_the_model(ingress: Ingress) -> None:
    serve.run(Models.bind(), name="models", route_prefix="/models")
    for model in ("a", "b", "a"):
        reply = httpx.get(
            ingress.url("/models"), headers={"serve_multiplexed_model_id": model}, timeout=30
        )
        assert reply.text == f"model {model}"


def test_fastapi_ingress_runs_the_users_app_in_the_replica(ingress: Ingress) -> None:
    serve.run(Shop.bind("Howdy"), name="shop", route_prefix="/shop")
    with httpx.Client(base_url=ingress.url("/shop"), timeout=10) as client:
        assert client.get("/").json() == "Howdy, world!"
        assert client.get("/items/7", params={"q": "red"}).json() == {"item_id": 7, "q": "red"}
        missing = client.get("/items/404")
        assert (missing.status_code, missing.json()) == (404, {"detail": "no such item"})
        invalid = client.get("/items/seven")
        assert invalid.status_code == 422  # FastAPI's validation, in the replica
        created = client.post("/items", json={"name": "hat", "price": 2.5})
        assert created.status_code == 201
        assert created.headers["x-shop"] == "yes"
        assert created.json() == {"created": "hat", "double": 5.0}
        boom = client.get("/boom")
        assert boom.status_code == 500
        assert client.get("/nowhere").status_code == 404
    # The handle API still reaches the class's methods.
    assert serve.get_app_handle("shop").root.remote().result() == "Howdy, world!"


def test_streaming_response_arrives_before_the_generator_ends(
    ingress: Ingress, tmp_path: Path
) -> None:
    serve.run(Shop.bind(), name="shop", route_prefix="/shop")
    release = tmp_path / "release"
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", ingress.url("/shop/stream"), params={"path": str(release)}) as reply,
    ):
        lines = reply.iter_lines()
        assert next(lines) == "first"  # while the generator waits for the file
        release.write_text("go")
        assert next(lines) == "second"


def test_websocket_echo(ingress: Ingress) -> None:
    serve.run(Shop.bind("Echo"), name="shop", route_prefix="/shop")
    ws_url = ingress.url("/shop/ws").replace("http://", "ws://")
    with websockets.sync.client.connect(ws_url, open_timeout=10) as ws:
        for text in ("one", "two", "three"):
            ws.send(text)
            assert ws.recv(timeout=10) == f"Echo: {text}"


def test_client_disconnect_cancels_the_request_in_the_replica(
    ingress: Ingress, tmp_path: Path
) -> None:
    serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    marker = tmp_path / "cancelled"
    with socket.create_connection(ingress.host_port("/slow"), timeout=10) as sock:
        sock.sendall(f"GET /slow?path={marker} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_for(Path(f"{marker}.started").exists, timeout_s=10)
    wait_for(marker.exists, timeout_s=10)
    assert marker.read_text() == "cancelled"


def test_backpressure_is_503(ingress: Ingress, tmp_path: Path) -> None:
    serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    marker = tmp_path / "x"
    url = ingress.url(f"/slow?path={marker}")

    async def main() -> set[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            running = asyncio.create_task(client.get(url))
            started = Path(f"{marker}.started")
            await asyncio.to_thread(wait_for, started.exists, 10.0)
            # One runs (max_ongoing_requests=1) and one may wait (max_queued_requests=1):
            # of five more, the others are refused at once.
            more = [asyncio.create_task(client.get(url)) for _ in range(5)]
            answered: set[int] = set()
            pending: set[asyncio.Task[httpx.Response]] = set(more)
            while pending and 503 not in answered:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                answered |= {task.result().status_code for task in done}
            for task in [running, *more]:
                task.cancel()
            await asyncio.gather(running, *more, return_exceptions=True)
            return answered

    assert asyncio.run(main()) == {503}


def test_no_route_is_404_and_builtin_routes(ingress: Ingress) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    # Direct: the echo replica itself answers all of it (Ray's direct ingress answers so).
    missing = httpx.get(ingress.url("/nothing-here", app="echo"), timeout=10)
    assert missing.status_code == 404
    assert "/-/routes" in missing.text
    assert httpx.get(ingress.url("/-/healthz", app="echo"), timeout=10).text == "success"
    routes = httpx.get(ingress.url("/-/routes", app="echo"), timeout=10)
    assert routes.json() == {"/echo": "echo"}


def test_replica_death_is_500_with_a_clear_body(ingress: Ingress) -> None:
    serve.run(Dies.bind(), name="dies", route_prefix="/dies")
    url = ingress.url("/dies")
    if ingress.mode == "direct":  # nobody between the client and the replica to answer
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url, timeout=10)
        return
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 500
    assert "ReplicaDiedError" in reply.text
    assert "it was not retried" in reply.text


def test_two_applications_on_two_prefixes_longest_prefix_wins(ingress: Ingress) -> None:
    serve.run(Shop.bind(), name="shop", route_prefix="/shop")
    serve.run(Echo.bind(), name="root", route_prefix="/")
    with httpx.Client(timeout=10) as client:
        assert client.get(ingress.url("/shop/")).json() == "Hello, world!"
        # Not under /shop: the root application's (direct: its replica's).
        assert client.get(ingress.url("/shopping")).json()["path"] == "/shopping"
        assert client.get(ingress.url("/other/x")).json()["path"] == "/other/x"
        routes = client.get(ingress.url("/-/routes")).json()
        if ingress.mode == "direct":  # a replica knows its own route, as Ray's
            assert routes == {"/": "root"}
        else:
            assert routes == {"/": "root", "/shop": "shop"}
    serve.delete("shop")
    wait_for(lambda: httpx.get(ingress.url("/shop/"), timeout=10).status_code == 200, timeout_s=10)
    assert httpx.get(ingress.url("/shop/"), timeout=10).json()["path"] == "/shop/"


def test_redeploy_under_http_load_fails_no_request(ingress: Ingress) -> None:
    if ingress.mode == "direct":
        pytest.skip("a rolling update needs a load balancer in front of the replicas")
    serve.run(Versioned.options(num_replicas=2).bind("v1"), name="ver", route_prefix="/ver")
    url = ingress.url("/ver")
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(20_000):  # bounded, and bounded in time by `stop`
                if stop.is_set():
                    return
                try:
                    reply = client.get(url)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text}")
                else:
                    seen[reply.text] = seen.get(reply.text, 0) + 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: seen.get("v1", 0) > 20, timeout_s=20)
        serve.run(Versioned.options(num_replicas=2, version="2").bind("v2"), name="ver")
        wait_for(lambda: seen.get("v2", 0) > 20, timeout_s=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []


def test_killed_proxy_is_replaced(http_url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    old = proxy_details()
    os.kill(old.pid, signal.SIGKILL)

    def replaced() -> object:
        details = proxy_details()
        return details if details.pid != old.pid else None

    new = wait_for(replaced, timeout_s=30, interval_s=0.1)
    reply = httpx.get(f"http://{new.http_address}/echo", timeout=10)
    assert reply.json()["path"] == "/echo"


def test_the_http_ingress_example_runs(tmp_path: Path) -> None:
    port = free_port()
    result = run_example("examples/http_ingress.py", tmp_path, port, SERVE_LOG_LEVEL="INFO")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "http ingress example OK"
    # serve.run says where each application is served.
    assert f"Application 'notes' is ready at http://127.0.0.1:{port}/api." in result.stderr
