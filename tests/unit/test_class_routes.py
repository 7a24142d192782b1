"""A ``@serve.ingress`` class's FastAPI routes run on the replica's instance: rebuilt once around
the bound method, with every option of the route kept, in the app itself (no router level
added), after the app's other routes as Ray puts them; another class's routes are dropped."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fastapi import FastAPI, Header
from fastapi.routing import APIRoute

from replica.class_routes import bind_class_routes
from serve.exceptions import ServeError


async def call(app: Any, path: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Any:
    """GET ``path`` from the ASGI app: (status, body)."""
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "state": {},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


def build() -> tuple[FastAPI, Any]:
    app = FastAPI()

    @app.get("/free")
    def free() -> str:
        return "free"

    class Other:
        @app.get("/other")
        def other(self) -> str:
            return "other"

    class Shop:
        def __init__(self) -> None:
            self.greeting = "hello"

        @app.get("/", status_code=201, tags=["shop"], name="home")
        async def root(self) -> str:
            return self.greeting

        @app.get("/items/{item_id}")
        def item(self, item_id: int, q: str = "", x_tag: str = Header("")) -> dict[str, Any]:
            return {"item_id": item_id, "q": q, "tag": x_tag, "greeting": self.greeting}

    return app, Shop()


async def test_routes_run_on_the_instance_with_their_options() -> None:
    app, shop = build()
    bind_class_routes(app, shop)
    assert await call(app, "/") == (201, b'"hello"')
    status, body = await call(app, "/items/7?q=red", ((b"x-tag", b"t"),))
    assert status == 200
    assert orjson.loads(body) == {"item_id": 7, "q": "red", "tag": "t", "greeting": "hello"}
    shop.greeting = "hi"  # the instance itself, not a copy
    assert await call(app, "/") == (201, b'"hi"')
    home = next(r for r in app.router.routes if getattr(r, "name", "") == "home")
    assert isinstance(home, APIRoute)
    assert (home.tags, home.methods, home.status_code) == (["shop"], {"GET"}, 201)
    assert getattr(home.endpoint, "__self__", None) is shop
    schema = app.openapi()
    assert sorted(schema["paths"]) == ["/", "/free", "/items/{item_id}"]
    parameters = schema["paths"]["/items/{item_id}"]["get"]["parameters"]
    assert [p["name"] for p in parameters] == ["item_id", "q", "x-tag"]  # no `self`


async def test_the_class_routes_join_the_app_itself_after_its_other_routes() -> None:
    app, shop = build()
    bind_class_routes(app, shop)
    paths = [getattr(r, "path", None) for r in app.router.routes]
    assert paths[-3:] == ["/free", "/", "/items/{item_id}"]
    assert "/other" not in paths  # another deployment's route
    assert all(isinstance(r, APIRoute) for r in app.router.routes[-3:])
    assert await call(app, "/free") == (200, b'"free"')
    assert (await call(app, "/other"))[0] == 404


def test_a_method_without_self_is_refused() -> None:
    app = FastAPI()

    class Shop:
        @app.get("/")
        @staticmethod
        def root() -> str:
            return "x"

    with pytest.raises(ServeError, match="take `self` as their first parameter"):
        bind_class_routes(app, Shop())
