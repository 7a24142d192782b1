"""The raw HTTP floor for `make bench`: a bare uvicorn (httptools + uvloop, one worker) serving a
hello-world raw ASGI callable in its own process. No framework, no serve code: the least an
HTTP ingress built on uvicorn can cost on this machine. With the argument ``fastapi`` it serves
the bench's FastAPI noop app instead (the same route as the `@serve.ingress(FastAPI)` bench
deployment): what that app costs on uvicorn alone. Prints the port on stdout and serves until
stdin closes.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvicorn
import uvloop

BODY = b"ok"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def fastapi_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def root() -> str:
        return "ok"

    return app


async def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # connections queue from now on, before uvicorn starts serving
    config = uvicorn.Config(
        fastapi_app() if sys.argv[1:] == ["fastapi"] else app,
        http="httptools",
        loop="none",  # already on uvloop
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    server = uvicorn.Server(config)

    async def stop_when_stdin_closes() -> None:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        server.should_exit = True

    watcher = asyncio.create_task(stop_when_stdin_closes())
    sys.stdout.write(f"{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    await server.serve(sockets=[sock])
    watcher.cancel()


if __name__ == "__main__":
    uvloop.run(main())
