"""Application builders: functions that take arguments and return an application, so one
module serves many configurations. ``serve run`` passes ``key=value`` arguments to them and a
config file its ``args:``::

    serve run examples.app_builders:build_typed greeting=Howdy excited=true
    serve build examples.app_builders:build_typed -o app.yaml

Run it: ``python examples/app_builders.py`` (each builder called from Python).
"""

from typing import Any

from pydantic import BaseModel

import serve
from serve import Application
from serve.handle import DeploymentHandle


@serve.deployment
class Greeter:
    def __init__(self, greeting: str, excited: bool = False) -> None:
        self.end = "!" if excited else "."
        self.greeting = greeting

    def __call__(self, name: str) -> str:
        return f"{self.greeting}, {name}{self.end}"


# --8<-- [start:untyped]
def build_plain(args: dict[str, Any]) -> Application:
    """``args`` arrive as given: strings from the command line, YAML values from a file."""
    return Greeter.bind(args.get("greeting", "Hello"), excited=args.get("excited") == "true")


# --8<-- [end:untyped]


# --8<-- [start:typed]
class GreeterArgs(BaseModel):
    greeting: str
    excited: bool = False


def build_typed(args: GreeterArgs) -> Application:
    """Annotated with a pydantic model: args are validated (and converted) before the call."""
    return Greeter.bind(args.greeting, excited=args.excited)


# --8<-- [end:typed]


# --8<-- [start:composed]
@serve.deployment
class Pipeline:
    def __init__(self, first: DeploymentHandle, second: DeploymentHandle) -> None:
        self.first, self.second = first, second

    async def __call__(self, name: str) -> str:
        return f"{await self.first.remote(name)} {await self.second.remote(name)}"


class PipelineArgs(BaseModel):
    first_greeting: str
    second_greeting: str


def build_pipeline(args: PipelineArgs) -> Application:
    """A builder may wire a whole graph from its arguments."""
    first = Greeter.options(name="First").bind(args.first_greeting)
    second = Greeter.options(name="Second").bind(args.second_greeting, excited=True)
    return Pipeline.bind(first, second)


# --8<-- [end:composed]

if __name__ == "__main__":
    # Each is its own application; none of them needs HTTP here (route_prefix=None).
    app = build_plain({"greeting": "Hi", "excited": "true"})
    plain = serve.run(app, name="plain", route_prefix=None)
    assert plain.remote("Ada").result() == "Hi, Ada!"
    typed = serve.run(build_typed(GreeterArgs(greeting="Howdy")), name="typed", route_prefix=None)
    assert typed.remote("Bob").result() == "Howdy, Bob."
    args = PipelineArgs(first_greeting="Hello", second_greeting="Welcome")
    pipeline = serve.run(build_pipeline(args), name="pipeline", route_prefix=None)
    assert pipeline.remote("Cy").result() == "Hello, Cy. Welcome, Cy!"
    serve.shutdown()
    print("app builders example OK")
