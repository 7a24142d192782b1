"""The proxy's HTTP/1.1 and WebSocket protocols: uvicorn's (httptools, websockets), with the
bounds of a front door.

uvicorn bounds nothing a client sends on the httptools path: a request head of any size (parsed
by concatenation, so a big one also costs quadratic time), any number of headers, connections
that never send a byte, heads and bodies that stall. Here, per connection:

- the request line plus headers may take ``SERVE_HTTP_MAX_HEADER_BYTES``, counted as bytes
  arrive (before httptools sees them), and ``SERVE_HTTP_MAX_HEADERS`` fields: 431, then the
  connection is closed;
- a head must be complete ``SERVE_HTTP_HEADER_TIMEOUT_S`` after the connection opened or its
  first byte arrived (408 if part of it came, else the connection is just closed);
- a declared body over ``SERVE_HTTP_MAX_BODY_BYTES`` is refused with 413 before any of it is
  read, a chunked one when it gets there;
- a body that sends nothing for ``SERVE_HTTP_BODY_TIMEOUT_S`` while the proxy waits for it is
  cut (408 if no response started). Time the proxy itself does not read (a replica that reads
  slowly, the ingress window full) does not count;
- past ``SERVE_HTTP_MAX_CONNECTIONS`` connections in this process, a new one makes room by
  closing the connection idle longest (one with no request in progress: just opened, between
  keep-alive requests, or still sending its head); with none idle it is answered 503 and closed.
  So idle and half-sent connections can never lock out a client with a request to make.

A connection that ends is announced to the app through :class:`ConnectionWatch` (the scope's
``"serve.connection"``), so a request blocked on backpressure hears of its client's departure at
once instead of at its next read.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import warnings
from collections.abc import Callable
from typing import Any

from uvicorn.config import UvicornDeprecationWarning
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

with warnings.catch_warnings():
    # uvicorn 0.55 deprecates its websockets (legacy) protocol in favour of the sans-I/O one,
    # and websockets 14 its legacy module; the bounds below extend the legacy protocol, so
    # every proxy would log the warnings at start.
    warnings.simplefilter("ignore", UvicornDeprecationWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    from uvicorn.protocols.websockets.websockets_impl import WebSocketProtocol

from serve._rpc.channel import fd_connection_share, raise_open_file_limit
from serve._settings import settings
from serve.config import HTTPOptions

logger = logging.getLogger(__name__)

CONNECTION_KEY = "serve.connection"  # the scope key of a request's ConnectionWatch

_IDLE, _HEAD, _BODY = 0, 1, 2  # no request in progress; its head arriving; its body arriving


class ConnectionWatch:
    """Whether a client connection has ended, for the app serving a request on it: ask
    (``closed``), wait (``wait_closed()``), or be called (``on_close``, set by the request in
    progress: HTTP/1.1 serves one request at a time on a connection)."""

    __slots__ = ("_gone", "closed", "on_close")

    def __init__(self) -> None:
        self.closed = False
        self._gone: asyncio.Event | None = None
        self.on_close: Callable[[], None] | None = None

    def close(self) -> None:
        self.closed = True
        if self._gone is not None:
            self._gone.set()
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()

    async def wait_closed(self) -> None:
        if self.closed:
            return
        if self._gone is None:
            self._gone = asyncio.Event()
        await self._gone.wait()


class HeadCoalescer:
    """The transport one request's uvicorn cycle writes to: its first write, the response's
    head (status line and headers), is held until the next one, its first body, so a whole
    small response costs one ``send()`` syscall instead of two (on loopback each also wakes
    the client). An app that sends its head and then waits is not held back: the head goes
    at the end of the loop turn it was written in."""

    __slots__ = ("_first", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._first = True
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._first:
            self._first = False
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        held = self._held
        if held is None:
            self._transport.write(data)
            return
        self._held = None
        if len(data) <= _JOIN_MAX_BYTES:
            self._transport.write(held + data)
        else:  # one writev, no copy of a big body
            self._transport.writelines((held, data))

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_JOIN_MAX_BYTES = 16 * 1024  # a body up to this is copied after the head: one plain write


class IdleConnections:
    """The connections of this process with no request in progress, idle longest first."""

    def __init__(self) -> None:
        self._idle: collections.OrderedDict[BoundedHttpProtocol, None] = collections.OrderedDict()

    def idle(self, protocol: BoundedHttpProtocol) -> None:
        self._idle.pop(protocol, None)
        self._idle[protocol] = None

    def busy(self, protocol: BoundedHttpProtocol) -> None:
        self._idle.pop(protocol, None)

    def evict_one(self, keep: BoundedHttpProtocol) -> bool:
        """Close the connection idle longest (not ``keep``); False if there is none."""
        for protocol in self._idle:
            if protocol is not keep:
                del self._idle[protocol]
                protocol.evict()
                return True
        return False

    def __len__(self) -> int:
        return len(self._idle)


class _Refused(Exception):
    """Stop parsing: answer ``status`` with ``text`` and close the connection."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def raw_response(status: int, text: str) -> bytes:
    """A whole HTTP/1.1 response that closes its connection, written without the app."""
    body = text.encode()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds in the module docstring. The server's
    ``Limits`` (one per process) are bound in by :func:`protocol_classes`."""

    limits: Limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watch = ConnectionWatch()
        self._phase = _IDLE
        self._head_bytes = 0
        self._header_count = 0
        self._body_bytes = 0
        self._body_activity = 0.0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._request_cycle: Any = None  # the RequestResponseCycle of the request in progress
        self._refused: _Refused | None = None  # raised in a parser callback

    # The connection.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self.limits
        if len(self.connections) > limits.max_connections and not limits.idle.evict_one(self):
            logger.warning(
                "%d connections (SERVE_HTTP_MAX_CONNECTIONS=%d), none idle: refusing one",
                len(self.connections),
                limits.max_connections,
            )
            self._refuse(
                503,
                f"The proxy holds {limits.max_connections} connections with requests in "
                "progress (SERVE_HTTP_MAX_CONNECTIONS); retry later.",
            )
            return
        limits.idle.idle(self)
        self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.limits.idle.busy(self)
        self._cancel_timers()
        self.watch.close()
        super().connection_lost(exc)

    def evict(self) -> None:
        """Closed to make room for a new connection (it had no request in progress)."""
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._phase == _BODY:
            self._body_activity = self.loop.time()
            super().data_received(data)
        else:
            # The head is counted as it arrives, before httptools buffers any of it.
            budget = self.limits.max_header_bytes - self._head_bytes
            if len(data) <= budget:
                self._head_bytes += len(data)
                super().data_received(data)
            else:
                self._head_bytes += budget
                super().data_received(data[:budget])
                if self._phase != _BODY and not self.transport.is_closing():
                    self._refuse(431, self._too_large_head())
                    return
                rest = data[budget:]
                if rest and not self.transport.is_closing():
                    # To this protocol, or to the WebSocket it was upgraded to.
                    self.transport.get_protocol().data_received(rest)  # type: ignore[attr-defined]
                return
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed, or upgraded to a WebSocket
        if self._phase == _HEAD and self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timeout
            )
        elif self._phase == _BODY and self._body_timer is None:
            self._body_activity = self.loop.time()
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers 400 to whatever a parser callback raised: ours carry their own answer.
        refused, self._refused = self._refused, None
        if refused is None:
            super().send_400_response(msg)
        else:
            self._refuse(refused.status, refused.text)

    def _refusal(self, status: int, text: str) -> _Refused:
        """Raise it in a parser callback: parsing stops, and ``status`` is answered."""
        self._refused = _Refused(status, text)
        return self._refused

    # Parser callbacks.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[CONNECTION_KEY] = self.watch  # type: ignore[literal-required]
        self._phase = _HEAD
        self._header_count = 0
        self._body_bytes = 0
        self._request_cycle = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise self._refusal(
                431,
                f"Request has over {self.limits.max_headers} header fields "
                "(SERVE_HTTP_MAX_HEADERS).",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._head_bytes = 0
        self.limits.idle.busy(self)  # a request in progress: never evicted
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        length = self.parser.get_method() != b"HEAD" and _content_length(self.headers)
        if length and length > self.limits.max_body_bytes:
            raise self._refusal(413, self._too_large_body())
        previous = self.cycle
        super().on_headers_complete()
        self._request_cycle = cycle = self.cycle
        if cycle is not None and cycle is not previous:  # a request, not a WebSocket upgrade
            cycle.transport = HeadCoalescer(self.transport, self.loop)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            raise self._refusal(413, self._too_large_body())
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()
        self._note_idle()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._note_idle()

    def _note_idle(self) -> None:
        """No request in progress (its body read and its response sent): evictable."""
        cycle = self._request_cycle
        if (
            self._phase == _IDLE
            and (cycle is None or cycle.response_complete)
            and not self.pipeline
            and not self.transport.is_closing()
        ):
            self.limits.idle.idle(self)

    # Timers and refusals.

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._phase == _BODY or self.transport.is_closing():
            return
        if self._phase == _HEAD:
            self._refuse(
                408,
                f"The request head did not arrive within {self.limits.header_timeout_s}s "
                "(SERVE_HTTP_HEADER_TIMEOUT_S).",
            )
        else:  # opened, and never sent a byte
            self.limits.idle.busy(self)
            self.transport.close()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self._phase != _BODY or self.transport.is_closing():
            return
        cycle = self._request_cycle
        now = self.loop.time()
        timeout_s = self.limits.body_timeout_s
        if (
            cycle is not None
            and not cycle.response_complete
            and (self.flow.read_paused or cycle.body)
        ):
            # The proxy is not reading (its app has body it has not taken yet): the client
            # is not the one stalling, so its clock starts again when the proxy reads.
            self._body_activity = now
        idle_s = now - self._body_activity
        if idle_s < timeout_s:
            self._body_timer = self.loop.call_later(timeout_s - idle_s, self._body_timeout)
            return
        self._refuse(
            408,
            f"The request body sent nothing for {timeout_s}s (SERVE_HTTP_BODY_TIMEOUT_S).",
        )

    def _refuse(self, status: int, text: str) -> None:
        """Answer ``status`` unless a response already started, then close the connection."""
        self._cancel_timers()
        self.limits.idle.busy(self)
        cycle = self._request_cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(raw_response(status, text))
        if cycle is not None:  # the app hears a disconnect; its sends are dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _too_large_head(self) -> str:
        return (
            f"Request line and headers exceed {self.limits.max_header_bytes} bytes "
            "(SERVE_HTTP_MAX_HEADER_BYTES)."
        )

    def _too_large_body(self) -> str:
        return (
            f"Request body exceeds {self.limits.max_body_bytes} bytes (SERVE_HTTP_MAX_BODY_BYTES)."
        )


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0  # httptools refuses it as malformed
    return 0


class BoundedWebSocketProtocol(WebSocketProtocol):
    """uvicorn's websockets protocol, announcing its end to the app (``ConnectionWatch``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watch = ConnectionWatch()

    async def run_asgi(self) -> None:
        self.scope[CONNECTION_KEY] = self.watch  # type: ignore[literal-required]
        await super().run_asgi()

    def connection_lost(self, exc: Exception | None) -> None:
        self.watch.close()
        super().connection_lost(exc)


class Limits:
    """One proxy process's connection bounds, read from the settings once."""

    def __init__(self, max_connections: int) -> None:
        s = settings()
        self.max_connections = max_connections
        self.max_header_bytes = s.http_max_header_bytes
        self.max_headers = s.http_max_headers
        self.header_timeout_s = s.http_header_timeout_s
        self.body_timeout_s = s.http_body_timeout_s
        self.max_body_bytes = s.http_max_body_bytes
        self.idle = IdleConnections()


def protocol_classes(max_connections: int) -> tuple[type[BoundedHttpProtocol], type[Any]]:
    """The HTTP and WebSocket protocol classes for one server, sharing one ``Limits``."""
    limits = Limits(max_connections)
    http = type("ProxyHttpProtocol", (BoundedHttpProtocol,), {"limits": limits})
    return http, BoundedWebSocketProtocol


def server_config(app: Any, http: HTTPOptions) -> Any:
    """A loaded ``uvicorn.Config`` serving ``app`` with these bounds and ``http``'s options
    (keep-alive, TLS), for the proxy and for ingress replicas that serve HTTP themselves.
    Raises ``SystemExit`` naming the files when the TLS key or certificate cannot be loaded."""
    import uvicorn

    s = settings()
    # Connections beyond the cap would exhaust the descriptors the process needs.
    max_connections = min(s.http_max_connections, fd_connection_share(raise_open_file_limit()))
    http_protocol, ws_protocol = protocol_classes(max_connections)
    config = uvicorn.Config(
        app,
        http=http_protocol,
        ws=ws_protocol,
        ws_max_size=s.websocket_max_message_bytes,
        ws_max_queue=s.websocket_max_queue,
        lifespan="off",
        access_log=False,
        proxy_headers=False,  # the server faces its clients: the peer is the client
        log_config=None,
        timeout_keep_alive=max(1, round(http.keep_alive_timeout_s)),
        ssl_keyfile=http.ssl_keyfile,
        ssl_certfile=http.ssl_certfile,
        ssl_keyfile_password=http.ssl_keyfile_password,
        ssl_ca_certs=http.ssl_ca_certs,
    )
    try:
        config.load()  # the TLS files are read here: a bad one is reported, not retried
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise SystemExit(
            f"cannot serve HTTPS with ssl_keyfile={http.ssl_keyfile!r} and "
            f"ssl_certfile={http.ssl_certfile!r}: {exc}. Check the files (PEM) and the key's "
            "password (ssl_keyfile_password)."
        ) from exc
    return config
