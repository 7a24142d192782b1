"""Register a servicer from its proto service descriptor, refusing malformed messages cleanly.

gRPC's own path for an undecodable request is an UNKNOWN status and a logged traceback; here
the caller gets INVALID_ARGUMENT naming the message type it should have sent, and the daemon logs
nothing. Methods named in ``raw`` take and return bytes (the Connect stream). Other
bidirectional methods get their requests parsed, one by one; the first malformed one ends
the call with INVALID_ARGUMENT.

A request made only of names and numbers (no ``bytes`` field anywhere in it: GetStatus,
CheckHealth, ReportLoad, ...) larger than SERVE_MAX_CONTROL_MESSAGE_BYTES is refused with
RESOURCE_EXHAUSTED before it is parsed. grpc.aio hands a handler only whole messages, so this
check runs once the request has arrived; what bounds memory is the server-wide limit, which
gRPC's core enforces from the length prefix (see ``serve._rpc.channel.server_options``).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)
from google.protobuf.message_factory import GetMessageClass

from serve._rpc.channel import Context, Handler
from serve._settings import settings


class _Refused:
    """What the deserializer hands the handler instead of a request it would not parse."""

    __slots__ = ("code", "details")

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


def _carries_payload(message: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message has a ``bytes`` field anywhere in it (code, arguments, user config)."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return True
        inner = field.message_type
        if inner is None or inner.full_name in seen:
            continue
        if _carries_payload(inner, seen | {message.full_name}):
            return True
    return False


def _control_limit(method: MethodDescriptor) -> int | None:
    """The byte limit of a request made only of names and numbers, or None for one that carries
    a payload (code, arguments, user config): only the server-wide limit bounds those."""
    if _carries_payload(method.input_type):
        return None
    return settings().max_control_message_bytes


def _parser(method: MethodDescriptor) -> Callable[[bytes], Any]:
    message_class = GetMessageClass(method.input_type)
    limit = _control_limit(method)

    def parse(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{method.name} request refused: {len(data)} bytes, over the {limit}-byte "
                "limit for control calls (SERVE_MAX_CONTROL_MESSAGE_BYTES on the receiving "
                "daemon); a control call carries names and numbers only, so send a smaller "
                "request or raise the limit.",
            )
        try:
            return message_class.FromString(data)
        except Exception as exc:
            return _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Malformed {method.name} request ({exc}); send a "
                f"{method.input_type.full_name} message.",
            )

    return parse


def _unary_unary(fn: Callable[..., Any]) -> Any:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, _Refused):
            await context.abort(request.code, request.details)
        return await fn(request, context)

    return handle


def _unary_stream(fn: Callable[..., Any]) -> Any:
    if not inspect.isasyncgenfunction(fn):  # it writes with context.write() itself
        return _unary_unary(fn)

    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, _Refused):
            await context.abort(request.code, request.details)
        async for reply in fn(request, context):
            yield reply

    return handle


def _stream_stream(fn: Callable[..., Any]) -> Any:
    async def handle(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async def parsed() -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Refused):
                    await context.abort(request.code, request.details)
                yield request

        async for reply in fn(parsed(), context):
            yield reply

    return handle


def add_service(
    server: grpc.aio.Server,
    file_descriptor: FileDescriptor,
    service_name: str,
    servicer: object,
    *,
    raw: Iterable[str] = (),
) -> None:
    """Add every method of ``service_name`` (implemented by ``servicer``) to ``server``."""
    service = file_descriptor.services_by_name[service_name]
    raw_methods = set(raw)
    handlers: dict[str, Handler] = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        if method.name in raw_methods:
            if not (method.client_streaming and method.server_streaming):
                raise ValueError(f"{method.name}: only bidirectional methods can be raw")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(fn)
            continue
        parse = _parser(method)
        serialize = GetMessageClass(method.output_type).SerializeToString
        if method.client_streaming:
            if not method.server_streaming:
                raise ValueError(f"{method.name}: client-streaming methods must be bidirectional")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _stream_stream(fn), request_deserializer=parse, response_serializer=serialize
            )
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _unary_stream(fn),
                request_deserializer=parse,
                response_serializer=serialize,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary_unary(fn),
                request_deserializer=parse,
                response_serializer=serialize,
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
