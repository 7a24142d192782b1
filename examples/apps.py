"""Applications for examples/config.yaml (and `serve run examples.apps:app`)."""

from typing import Any

import serve
from serve.handle import DeploymentHandle


@serve.deployment
class Greeter:
    def __init__(self) -> None:
        self._greeting = "Hello"

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._greeting = config.get("greeting", "Hello")

    def __call__(self, name: str) -> str:
        return f"{self._greeting} {name}!"


@serve.deployment
class Front:
    def __init__(self, greeter: DeploymentHandle) -> None:
        self._greeter = greeter

    async def __call__(self, name: str) -> str:
        return await self._greeter.remote(name)


app = Front.bind(Greeter.bind())


@serve.deployment
class Echo:
    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    def __call__(self, text: str) -> str:
        return f"{self._prefix}{text}"


def build_echo(args: dict[str, Any]) -> serve.Application:
    """An application builder: `serve deploy` passes the config's `args`."""
    return Echo.bind(args.get("prefix", ""))
