"""gRPC helpers for ingress deployments, as Ray's ``ray.serve.grpc_util``.

A deployment method that serves a gRPC method may take a keyword argument named
``grpc_context``: it gets a :class:`RayServegRPCContext` describing the call (the client's
metadata, its peer) on which it can set the status code, details, trailing metadata and
compression the client receives. A client-streaming or bidirectional-streaming method gets a
:class:`gRPCInputStream` of the client's request messages instead of one message::

    @serve.deployment
    class Adder:
        async def Sum(self, requests: gRPCInputStream, grpc_context: RayServegRPCContext):
            total = 0
            async for request in requests:
                total += request.value
            grpc_context.set_trailing_metadata([("count", "done")])
            return SumReply(total=total)

Nothing here imports grpc: status codes are whatever ``grpc.StatusCode`` member the method
sets, carried to the proxy by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from serve._ingress import GrpcCall, GrpcCallEnd

__all__ = ["RayServegRPCContext", "gRPCInputStream"]

T = TypeVar("T")


class gRPCInputStream(AsyncIterator[T], Generic[T]):
    """The request messages of a client-streaming or bidirectional-streaming call, in order.

    Iterate it with ``async for``; it ends when the client closes its side (or cancels).
    """

    def __init__(
        self,
        request_iterator: AsyncIterator[Any],
        *,
        cancel_event: asyncio.Event | None = None,
    ) -> None:
        self._request_iterator = request_iterator
        self._cancel_event = cancel_event or asyncio.Event()
        self._exhausted = False

    def __aiter__(self) -> gRPCInputStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._exhausted or self._cancel_event.is_set():
            self._exhausted = True
            raise StopAsyncIteration
        try:
            message: T = await self._request_iterator.__anext__()
        except StopAsyncIteration:
            self._exhausted = True
            raise
        return message

    def is_cancelled(self) -> bool:
        """Whether the stream was cancelled (see :meth:`cancel`)."""
        return self._cancel_event.is_set()

    def cancel(self) -> None:
        """Stop the iteration: the next read ends the stream."""
        self._cancel_event.set()

    @property
    def is_exhausted(self) -> bool:
        """Whether every message was read."""
        return self._exhausted


class RayServegRPCContext:
    """The gRPC call a deployment method serves: read what the client sent, set what it
    receives. It mirrors ``grpc.ServicerContext``'s methods and pickles, so it travels with
    the request from the proxy to the replica and back."""

    def __init__(self, grpc_context: Any) -> None:
        self._auth_context: dict[str, Any] = dict(grpc_context.auth_context() or {})
        self._code: Any = grpc_context.code()
        self._details: str = grpc_context.details() or ""
        self._invocation_metadata = list(grpc_context.invocation_metadata() or ())
        self._peer: str = grpc_context.peer()
        self._peer_identities: Any = grpc_context.peer_identities()
        self._peer_identity_key: str | None = grpc_context.peer_identity_key()
        self._trailing_metadata = list(grpc_context.trailing_metadata() or ())
        self._compression: Any = None
        self._touched = False

    @classmethod
    def _from_call(cls, call: GrpcCall, request_id: str = "") -> RayServegRPCContext:
        context = cls.__new__(cls)
        context._auth_context = dict(call.auth_context)
        context._code = None
        context._details = ""
        context._invocation_metadata = list(call.invocation_metadata)
        context._peer = call.peer
        context._peer_identities = call.peer_identities
        context._peer_identity_key = call.peer_identity_key
        # As Ray's: the request id goes back to the client in the trailing metadata.
        context._trailing_metadata = [("request_id", request_id)] if request_id else []
        context._compression = None
        context._touched = False
        return context

    def auth_context(self) -> dict[str, Any]:
        """The call's auth properties (names to iterables of bytes)."""
        return self._auth_context

    def code(self) -> Any:
        """The status code the call ends with (None: not set, OK unless it fails)."""
        return self._code

    def details(self) -> str:
        """The status details the call ends with."""
        return self._details

    def invocation_metadata(self) -> list[tuple[str, str]]:
        """The metadata the client sent."""
        return self._invocation_metadata

    def _metadata(self, key: str) -> str | None:
        return next((v for k, v in self._invocation_metadata if k == key), None)

    def request_id(self) -> str | None:
        """The ``request_id`` metadata the client sent, if any."""
        return self._metadata("request_id")

    def application(self) -> str | None:
        """The ``application`` metadata (the application the call targets), if any."""
        return self._metadata("application")

    def multiplexed_model_id(self) -> str | None:
        """The ``multiplexed_model_id`` metadata, if any."""
        return self._metadata("multiplexed_model_id")

    def traceparent(self) -> str | None:
        """The W3C ``traceparent`` metadata, if any."""
        return self._metadata("traceparent")

    def tracestate(self) -> str | None:
        """The W3C ``tracestate`` metadata, if any."""
        return self._metadata("tracestate")

    def peer(self) -> str:
        """The client's address, as gRPC spells it (``ipv4:127.0.0.1:5555``)."""
        return self._peer

    def peer_identities(self) -> Any:
        """The client's identities when it authenticated (TLS), else None."""
        return self._peer_identities

    def peer_identity_key(self) -> str | None:
        """The auth property that names the client (``x509_common_name``), else None."""
        return self._peer_identity_key

    def trailing_metadata(self) -> list[tuple[str, Any]]:
        return self._trailing_metadata

    def set_code(self, code: Any) -> None:
        """End the call with this ``grpc.StatusCode``."""
        self._code = code
        self._touched = True

    def set_compression(self, compression: Any) -> None:
        """Compress the call's responses (a ``grpc.Compression``)."""
        self._compression = compression
        self._touched = True

    def set_details(self, details: str) -> None:
        """End the call with these status details."""
        self._details = details
        self._touched = True

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, Any]]) -> None:
        """Send this metadata when the call ends (the request id is kept, as in Ray)."""
        request_id = [(k, v) for k, v in self._trailing_metadata if k == "request_id"]
        self._trailing_metadata = request_id + list(trailing_metadata)
        self._touched = True

    def _end(self) -> GrpcCallEnd | None:
        """What the method set, for the proxy (None: nothing)."""
        if not self._touched:
            return None
        code = self._code
        return GrpcCallEnd(
            code=getattr(code, "name", "") if code is not None else "",
            details=self._details or "",
            trailing_metadata=tuple(self._trailing_metadata),
            compression=self._compression,
        )
