# ruff: noqa: E402 - each section imports what it uses, as in the Ray docs
"""The examples of Ray Serve's HTTP guide (doc/source/serve/doc_code/http_guide/http_guide.py in
ray-project/ray, Apache-2.0), changed only in their import: ``import serve`` for
``from ray import serve`` (and no ``import ray``).

Run it with ``python examples/http_guide.py``: it serves on http://localhost:8000 as Ray does
(set SERVE_DEFAULT_HTTP_PORT to use another port; the URLs below follow it).
"""

import os

BASE = f"http://localhost:{os.environ.get('SERVE_DEFAULT_HTTP_PORT', '8000')}"

# __begin_starlette__
import requests
import starlette.requests

import serve


@serve.deployment
class Counter:
    def __call__(self, request: starlette.requests.Request):
        return request.query_params


serve.run(Counter.bind())
resp = requests.get(f"{BASE}?a=b&c=d")
assert resp.json() == {"a": "b", "c": "d"}
# __end_starlette__

# __begin_fastapi__
import requests
from fastapi import FastAPI

import serve

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class MyFastAPIDeployment:
    @app.get("/")
    def root(self):
        return "Hello, world!"


serve.run(MyFastAPIDeployment.bind(), route_prefix="/hello")
resp = requests.get(f"{BASE}/hello")
assert resp.json() == "Hello, world!"
# __end_fastapi__


# __begin_fastapi_multi_routes__
import requests
from fastapi import FastAPI

import serve

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class MyFastAPIDeployment:
    @app.get("/")
    def root(self):
        return "Hello, world!"

    @app.post("/{subpath}")
    def root(self, subpath: str):  # noqa: F811 - as in Ray's docs
        return f"Hello from {subpath}!"


serve.run(MyFastAPIDeployment.bind(), route_prefix="/hello")
resp = requests.post(f"{BASE}/hello/Serve")
assert resp.json() == "Hello from Serve!"
# __end_fastapi_multi_routes__

# __begin_byo_fastapi__
import requests
from fastapi import FastAPI

import serve

app = FastAPI()


@app.get("/")
def f():
    return "Hello from the root!"


@serve.deployment
@serve.ingress(app)
class FastAPIWrapper:
    pass


serve.run(FastAPIWrapper.bind(), route_prefix="/")
resp = requests.get(f"{BASE}/")
assert resp.json() == "Hello from the root!"
# __end_byo_fastapi__

# The factory pattern (serve.ingress of a function that builds the app), without Ray's
# OpenTelemetry instrumentation.
from fastapi import FastAPI

import serve


def fastapi_factory():
    app = FastAPI()

    @app.get("/")
    def root():
        return {"message": "Built in the replica"}

    return app


deployment = serve.deployment(serve.ingress(fastapi_factory)())
serve.run(deployment.bind())
resp = requests.get(f"{BASE}/")
assert resp.json() == {"message": "Built in the replica"}

print("HTTP guide OK")
serve.shutdown()
