"""gRPC ingress, the replica half: run the deployment method a forwarded gRPC call names.

The proxy forwards every gRPC call as one streaming call of ``GRPC_METHOD`` (see
``serve/_ingress.py``) with the raw request message(s), knowing none of the user's protos.
Here the user's ``add_XServicer_to_server`` functions say how to decode the request, encode
the responses, and whether either side streams. A method that takes ``grpc_context`` gets a
``RayServegRPCContext``; one whose request streams gets a ``gRPCInputStream`` of the client's
messages, which the proxy feeds as the method reads them. Errors become gRPC statuses as a gRPC
server (and Ray) answers them: UNIMPLEMENTED for an unknown service or method,
INVALID_ARGUMENT for a message that does not decode, the code the method set on its context
when it raises after setting one.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from serve._context import RequestContext
from serve._ingress import INPUT_WANTED, GrpcCall, GrpcStatusError
from serve.exceptions import ServeError
from serve.grpc_util import RayServegRPCContext, gRPCInputStream

GRPC_CONTEXT_ARG_NAME = "grpc_context"  # Ray's: a method taking it gets the call's context


class MethodRunner(Protocol):
    """What runs the deployment's methods (the executor)."""

    def resolve(self, method_name: str) -> tuple[Callable[..., Any], str]: ...

    def call(
        self, method: str, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> Awaitable[Any]: ...

    def stream(
        self, method: str, args: Any, kwargs: dict[str, Any], request: RequestContext
    ) -> AsyncIterator[Any]: ...


_takes_context: dict[Callable[..., Any], bool] = {}


def takes_grpc_context(fn: Callable[..., Any]) -> bool:
    found = _takes_context.get(fn)
    if found is None:
        try:
            found = GRPC_CONTEXT_ARG_NAME in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            found = False
        _takes_context[fn] = found
    return found


async def serve_grpc_call(
    runner: MethodRunner,
    deployment: str,
    method: str,
    messages: list[bytes],
    servicer_functions: tuple[str, ...],
    call: GrpcCall | None,
    request: RequestContext,
) -> AsyncIterator[Any]:
    """The stream items of one forwarded call (see ``serve/_ingress.py``): INPUT_WANTED if
    the method reads a request stream, each encoded response, then a GrpcCallEnd if the
    method set anything on its context."""
    try:
        handler = grpc_method_handler(servicer_functions, method)
    except LookupError as exc:
        raise GrpcStatusError("UNIMPLEMENTED", str(exc)) from None
    name = method.rsplit("/", 1)[-1]
    try:
        fn, kind = runner.resolve(name)
    except ServeError as exc:
        raise GrpcStatusError(
            "UNIMPLEMENTED", f"Method {method} is not implemented by {deployment}: {exc}"
        ) from None
    decode = _decoder(handler.request_deserializer, method)
    encode = handler.response_serializer or (lambda value: value)
    context = None
    kwargs: dict[str, Any] = {}
    if takes_grpc_context(fn):
        context = RayServegRPCContext._from_call(call or GrpcCall(), request.request_id)
        kwargs[GRPC_CONTEXT_ARG_NAME] = context
    if handler.request_streaming:
        yield INPUT_WANTED  # the proxy starts feeding the client's further messages
        arg: Any = gRPCInputStream(_request_stream(messages, request, decode))
    elif len(messages) == 1:
        arg = decode(messages[0])
    else:
        raise GrpcStatusError(
            "INVALID_ARGUMENT",
            f"{method} takes one request message; the client sent {len(messages)}.",
        )
    try:
        if kind in ("gen", "asyncgen") or handler.response_streaming:
            async for item in runner.stream(name, (arg,), kwargs, request):
                yield encode(item)
        else:
            yield encode(await runner.call(name, (arg,), kwargs, request))
    except GrpcStatusError:
        raise
    except Exception as exc:
        code = context.code() if context is not None else None
        if code is None:
            raise  # INTERNAL, with the error's text
        # As Ray: the code the method set before raising is the call's status.
        details = (context.details() if context is not None else "") or str(exc)
        raise GrpcStatusError(getattr(code, "name", str(code)), details) from exc
    end = context._end() if context is not None else None
    if end is not None:
        yield end


def _decoder(deserialize: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def decode(payload: bytes) -> Any:
        if deserialize is None:
            return payload
        try:
            return deserialize(payload)
        except Exception as exc:
            raise GrpcStatusError(
                "INVALID_ARGUMENT", f"Could not decode the request message of {method}: {exc}"
            ) from None

    return decode


async def _request_stream(
    messages: list[bytes], request: RequestContext, decode: Callable[[bytes], Any]
) -> AsyncIterator[Any]:
    """The client's request messages: those that came with the call, then the fed ones."""
    for payload in messages:
        yield decode(payload)
    feed = request.feed
    if feed is None:  # called through a handle, not the proxy: nothing more will come
        return
    while True:
        message = await feed.get()
        kind = message.get("type")
        if kind == "grpc.message":
            yield decode(message["body"])
        else:  # grpc.end, or the client went away
            return


class _Capture:
    """Stands in for a grpc server: records the handlers a servicer function registers."""

    def __init__(self) -> None:
        self.generic: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass  # the generic handlers registered alongside cover the same methods


class _AnyServicer:
    """A servicer with every method: servicer functions only bind them."""

    def __getattr__(self, name: str) -> Any:
        return None


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[Any, ...] = ()


_grpc_handlers: dict[tuple[str, ...], list[Any]] = {}


class UnknownGrpcMethod(LookupError):
    """No servicer function registers the method."""


def grpc_method_handler(servicer_functions: tuple[str, ...], method: str) -> Any:
    """The grpc method handler (its request deserializer and response serializer) that the
    user's ``add_XServicer_to_server`` functions register for ``method``."""
    handlers = _grpc_handlers.get(servicer_functions)
    if handlers is None:
        capture = _Capture()
        for path in servicer_functions:
            module_name, _, attribute = path.rpartition(".")
            try:
                function = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError, ValueError) as exc:
                raise ServeError(
                    f"Could not import the gRPC servicer function {path!r} in the replica: "
                    f"{exc}. It must be importable where the deployment's code runs."
                ) from exc
            function(_AnyServicer(), capture)
        handlers = _grpc_handlers[servicer_functions] = capture.generic
    for generic in handlers:
        found = generic.service(_Details(method))
        if found is not None:
            return found
    raise UnknownGrpcMethod(
        f"gRPC method {method!r} is not in the servicer functions {list(servicer_functions)}."
    )
