# ruff: noqa: E402, F811, UP006, UP035 - Ray's doc code as it is: each section imports what it uses and redefines its classes
"""The examples of Ray Serve's "Pass arguments to applications" guide
(doc/source/serve/doc_code/app_builder.py in ray-project/ray, Apache-2.0), changed only in their
import: ``import serve`` for ``from ray import serve`` and ``from serve import Application`` for
``from ray.serve import Application``.

The last section (``composed_app_builder``) only defines a builder, as in Ray's file; its
``IngressDeployment``, ``Model1`` and ``Model2`` are the reader's own and are not defined there.

Run it with ``python examples/app_builder_guide.py``: it serves on http://localhost:8000 as Ray
does (set SERVE_DEFAULT_HTTP_PORT to use another port; the URLs below follow it).
"""

import os

BASE = f"http://localhost:{os.environ.get('SERVE_DEFAULT_HTTP_PORT', '8000')}"

# __begin_untyped_builder__
from typing import Dict

import serve
from serve import Application


@serve.deployment
class HelloWorld:
    def __init__(self, message: str):
        self._message = message
        print("Message:", self._message)

    def __call__(self, request):
        return self._message


def app_builder(args: Dict[str, str]) -> Application:
    return HelloWorld.bind(args["message"])


# __end_untyped_builder__

import requests

serve.run(app_builder({"message": "Hello bar"}))
resp = requests.get(BASE)
assert resp.text == "Hello bar"

# __begin_typed_builder__
from pydantic import BaseModel

import serve
from serve import Application


class HelloWorldArgs(BaseModel):
    message: str


@serve.deployment
class HelloWorld:
    def __init__(self, message: str):
        self._message = message
        print("Message:", self._message)

    def __call__(self, request):
        return self._message


def typed_app_builder(args: HelloWorldArgs) -> Application:
    return HelloWorld.bind(args.message)


# __end_typed_builder__

serve.run(typed_app_builder(HelloWorldArgs(message="Hello baz")))
resp = requests.get(BASE)
assert resp.text == "Hello baz"

# __begin_composed_builder__
from pydantic import BaseModel

from serve import Application


class ComposedArgs(BaseModel):
    model1_uri: str
    model2_uri: str


def composed_app_builder(args: ComposedArgs) -> Application:
    return IngressDeployment.bind(  # noqa: F821 - the reader's own, as in Ray's file
        Model1.bind(args.model1_uri),  # noqa: F821
        Model2.bind(args.model2_uri),  # noqa: F821
    )


# __end_composed_builder__

print("App builder guide OK")
serve.shutdown()
