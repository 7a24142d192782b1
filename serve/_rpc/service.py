"""Register a servicer from its proto service descriptor, refusing malformed messages cleanly.

gRPC's own path for an undecodable request is an UNKNOWN status and a logged traceback; here
the caller gets INVALID_ARGUMENT naming the message type it should have sent, and the daemon logs
nothing. Methods named in ``raw`` take and return bytes (the Connect stream); server-streaming
methods named in ``raw_responses`` parse their request but return bytes (the Results lane).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from serve._rpc.channel import Context, Handler


class _Malformed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parser(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:
            return _Malformed(str(exc))

    return parse


async def _refuse(context: Context, method: MethodDescriptor, reason: str) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"Malformed {method.name} request ({reason}); send a {method.input_type.full_name} "
        "message.",
    )


def _unary_unary(method: MethodDescriptor, fn: Callable[..., Any]) -> Any:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, _Malformed):
            await _refuse(context, method, request.reason)
        return await fn(request, context)

    return handle


def _unary_stream(method: MethodDescriptor, fn: Callable[..., Any]) -> Any:
    if not inspect.isasyncgenfunction(fn):  # it writes with context.write() itself
        return _unary_unary(method, fn)

    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await _refuse(context, method, request.reason)
        async for reply in fn(request, context):
            yield reply

    return handle


def add_service(
    server: grpc.aio.Server,
    file_descriptor: FileDescriptor,
    service_name: str,
    servicer: object,
    *,
    raw: Iterable[str] = (),
    raw_responses: Iterable[str] = (),
) -> None:
    """Add every method of ``service_name`` (implemented by ``servicer``) to ``server``."""
    service = file_descriptor.services_by_name[service_name]
    raw_methods = set(raw)
    raw_response_methods = set(raw_responses)
    handlers: dict[str, Handler] = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        if method.name in raw_methods:
            if not (method.client_streaming and method.server_streaming):
                raise ValueError(f"{method.name}: only bidirectional methods can be raw")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(fn)
            continue
        parse = _parser(GetMessageClass(method.input_type))
        serialize: Any = GetMessageClass(method.output_type).SerializeToString
        if method.name in raw_response_methods:
            serialize = None
        if method.client_streaming:
            raise ValueError(f"{method.name}: client-streaming methods must be raw")
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _unary_stream(method, fn),
                request_deserializer=parse,
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_unary(method, fn),
                request_deserializer=parse,
                response_serializer=serialize,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
