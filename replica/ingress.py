"""HTTP ingress, the replica half: run the user's ASGI app for requests the proxy forwards.

A forwarded connection is one streaming call (see ``serve/_ingress.py``): the app's ``receive``
returns the messages that came with the call, then the inputs the proxy feeds; what the app
sends goes back as stream items, each a list of ASGI messages (a response's start travels with
its first body chunk). A plain deployment's ``__call__`` gets a Starlette ``Request`` and may
return a Starlette ``Response`` or any value, converted as Ray does: ``str`` -> text/plain
UTF-8, ``bytes``/``None`` -> text/plain, anything else -> JSON.

Starlette and FastAPI are imported only when a replica serves HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from serve._context import Feed
from serve._ingress import body_messages
from serve.exceptions import BackPressureError, DeploymentUnavailableError, ServeError

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _receiver(scope: Scope, first: list[Message], feed: Feed | None) -> Receive:
    pending = collections.deque(first)
    websocket = scope["type"] == "websocket"
    gone: Message | None = None

    async def receive() -> Message:
        nonlocal gone
        if pending:
            return pending.popleft()
        if gone is not None:
            return gone
        if feed is None:  # called through a handle, not the proxy: nothing more will come
            await asyncio.Event().wait()
        assert feed is not None
        message = await feed.get()
        if message["type"] in ("http.disconnect", "websocket.disconnect"):
            gone = message
        elif websocket and message["type"] == "websocket.close":
            gone = {"type": "websocket.disconnect", "code": message.get("code", 1000)}
        return message

    return receive


async def serve_asgi(
    app: ASGIApp,
    scope: Scope,
    first: list[Message],
    *,
    feed: Feed | None,
    emit: Callable[[list[Message]], Awaitable[None]],
) -> None:
    """Run ``app`` for one forwarded connection in the request's own task; each message it
    sends goes to ``emit`` as it is sent (a response's start together with its first body
    chunk), so streamed bodies stream and cancelling the request cancels the app."""
    held: Message | None = None
    started = False

    async def send(message: Message) -> None:
        nonlocal held, started
        if message["type"] == "http.response.start":
            held = message
            return
        batch = [held, message] if held is not None else [message]
        held = None
        started = True
        await emit(batch)

    try:
        await app(scope, _receiver(scope, first, feed), send)
    except Exception:
        if not started:
            raise  # nothing went out: the proxy answers 500 with the error
        logger.exception("The ASGI app raised after its response started")
    if held is not None:
        await emit([held])


def call_app(call: Callable[[Any], Awaitable[Any]]) -> ASGIApp:
    """An ASGI app for a plain deployment: ``__call__(request)`` behind Starlette's Request."""
    from starlette.requests import Request
    from starlette.responses import Response

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise ServeError(
                f"Deployment got a {scope['type']} connection but only answers HTTP; use "
                "@serve.ingress with a FastAPI or Starlette app to accept WebSockets."
            )
        result = await call(Request(scope, receive))
        if isinstance(result, Response):
            await result(scope, receive, send)  # type: ignore[arg-type]
            return
        for message in response_messages(result):
            await send(message)

    return app


def response_messages(value: Any, status: int = 200) -> list[Message]:
    """The ASGI messages of a plain return value, converted as Ray converts it."""
    if value is None:
        body, content_type = b"", b"text/plain"
    elif isinstance(value, bytes):
        body, content_type = value, b"text/plain"
    elif isinstance(value, str):
        body, content_type = value.encode(), b"text/plain; charset=utf-8"
    else:
        import orjson
        from fastapi.encoders import jsonable_encoder

        body = orjson.dumps(jsonable_encoder(value))
        content_type = b"application/json"
    return body_messages(status, body, content_type)


def answer_serve_errors(app: Any) -> None:
    """Make an app with exception handlers (FastAPI, Starlette) answer a nested call's
    BackPressureError (its status: 503 or 429, with Retry-After) and DeploymentUnavailableError
    (503) as the proxy answers them, as Ray does: the framework would answer them 500."""
    add = getattr(app, "add_exception_handler", None)
    if add is None:
        return
    from starlette.responses import PlainTextResponse

    def answer(request: Any, exc: Exception) -> Any:
        headers = {}
        status = 503
        if isinstance(exc, BackPressureError):
            status = exc.status_code
            if exc.retry_after_s is not None:
                headers["retry-after"] = str(max(0, math.ceil(exc.retry_after_s)))
        return PlainTextResponse(str(exc), status_code=status, headers=headers)

    for kind in (BackPressureError, DeploymentUnavailableError):
        add(kind, answer)


class Lifespan:
    """The app's lifespan events (FastAPI's startup handlers and lifespan context), run as
    Ray's replica runs them: startup before the first request, shutdown at stop. An app
    without lifespan support is fine."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._answer: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self._run(scope), name="replica:lifespan")
        await self._phase("startup")

    async def shutdown(self) -> None:
        if self._task is not None and not self._task.done():
            await self._phase("shutdown")

    async def _phase(self, phase: str) -> None:
        self._inbox.put_nowait({"type": f"lifespan.{phase}"})
        answer = await self._answer.get()
        if answer["type"].endswith(".failed"):
            raise ServeError(f"The ASGI app's lifespan {phase} failed: {answer.get('message')}")

    async def _run(self, scope: Scope) -> None:
        try:
            await self._app(scope, self._inbox.get, self._send)
        except Exception:
            logger.debug("The ASGI app does not support lifespan events", exc_info=True)
        self._answer.put_nowait({"type": "lifespan.unsupported"})

    async def _send(self, message: Message) -> None:
        self._answer.put_nowait(message)
