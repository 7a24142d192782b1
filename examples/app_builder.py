"""Ray Serve's typed application builder example with only the import changed.

    serve run examples.app_builder:typed_app_builder message="Hello from args"

The builder's parameter is annotated with a pydantic model, so the args (from the command line
or a config file's ``args``) are validated into it first, as in Ray.
"""

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

    def __call__(self, name: str = "") -> str:
        return self._message


def typed_app_builder(args: HelloWorldArgs) -> Application:
    return HelloWorld.bind(args.message)


if __name__ == "__main__":
    handle = serve.run(typed_app_builder(HelloWorldArgs(message="Hello from args")))
    print(handle.remote().result())
