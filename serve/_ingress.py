"""HTTP ingress, the SDK half: ``serve.ingress`` and what the proxy and replicas agree on.

The proxy (``serve/_proxy``) forwards each HTTP or WebSocket connection to its application's
ingress deployment as one streaming call of :data:`ASGI_METHOD`: the arguments are the ASGI
scope and the receive messages already read (for HTTP, packed in one tuple by
:func:`pack_http`); further receive messages follow as inputs
(``DeploymentResponseGenerator._feed``); each stream item is a list of ASGI send messages.
The replica (``replica/ingress.py``) runs the user's ASGI app, or wraps ``__call__`` for a
plain deployment, which receives a Starlette ``Request`` as in Ray. Nothing here imports an
HTTP library: the SDK stays light.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import typing
from collections.abc import Callable
from typing import Any

from serve._frozen import Frozen

ASGI_METHOD = "__serve_asgi__"
GRPC_METHOD = "__serve_grpc__"
# Calls whose caller feeds them inputs while they run: an HTTP connection's receive messages,
# a gRPC call's further request messages (client and bidirectional streaming).
FED_METHODS = frozenset({ASGI_METHOD, GRPC_METHOD})
APP_ATTRIBUTE = "__serve_asgi_app__"  # set on a class by serve.ingress

# A forwarded gRPC call (GRPC_METHOD) streams back, in order: INPUT_WANTED when the method
# reads a request stream (the proxy then starts feeding the client's further messages as
# ``{"type": "grpc.message", "body": bytes}`` inputs, then ``{"type": "grpc.end"}``); each
# response message as bytes; and last, a GrpcCallEnd when the method set a status, details,
# trailing metadata or compression on its grpc_context.
INPUT_WANTED = "serve.grpc.input_wanted"
GRPC_END_INPUT = {"type": "grpc.end"}


@dataclasses.dataclass(frozen=True, slots=True)
class GrpcCall:
    """What the proxy tells the replica of a gRPC call (Ray's RayServegRPCContext is built
    from it): plain values, so it pickles."""

    invocation_metadata: tuple[tuple[str, str], ...] = ()
    peer: str = ""
    auth_context: dict[str, Any] = dataclasses.field(default_factory=dict)
    peer_identities: Any = None
    peer_identity_key: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GrpcCallEnd:
    """What the method set on its grpc_context, for the proxy to apply to the real call.
    ``code`` is a ``grpc.StatusCode`` name ("" when not set)."""

    code: str = ""
    details: str = ""
    trailing_metadata: tuple[tuple[str, Any], ...] = ()
    compression: Any = None


class GrpcStatusError(Exception):
    """A forwarded gRPC call ends with this status: ``code`` names a ``grpc.StatusCode``
    (``"UNIMPLEMENTED"``, ``"INVALID_ARGUMENT"``, ...). Raised in the ingress replica, where
    the user's protos are, and answered as that status by the proxy, which has none of them."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


def body_messages(
    status: int,
    body: bytes,
    content_type: bytes,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> list[dict[str, Any]]:
    """The ASGI messages of a whole response: its start, then its one body."""
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        },
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


# A forwarded HTTP request (not a WebSocket) travels as one tuple rather than as its scope dict
# and receive messages: unpickling fourteen string keys, making each again, was most of the
# replica's decoding of a request.
HTTP_SCOPE_FIELDS = (
    "asgi",
    "http_version",
    "scheme",
    "method",
    "path",
    "raw_path",
    "query_string",
    "root_path",
    "headers",
    "client",
    "server",
)
_http_fields = operator.itemgetter(*HTTP_SCOPE_FIELDS)
_ROOT_PATH = HTTP_SCOPE_FIELDS.index("root_path")


def pack_http(
    scope: dict[str, Any], first: list[dict[str, Any]], root_path: str
) -> tuple[Any, ...]:
    """The arguments of an :data:`ASGI_METHOD` call for an HTTP request: the scope's fields a
    replica needs (``root_path`` in place of its own) and the body chunks read so far, as
    :func:`unpack_asgi_args` takes them."""
    try:
        values = list(_http_fields(scope))
    except KeyError:  # a server that leaves an optional field out (uvicorn sets them all)
        values = [scope.get(key) for key in HTTP_SCOPE_FIELDS]
    values[_ROOT_PATH] = root_path
    extensions = scope.get("extensions")
    if len(first) == 1:
        message = first[0]
        return ((*values, extensions, message.get("body", b""), bool(message.get("more_body"))),)
    bodies = [message.get("body", b"") for message in first]
    more_body = bool(first[-1].get("more_body")) if first else True
    return ((*values, extensions, bodies, more_body),)


def unpack_asgi_args(args: tuple[Any, ...] | list[Any]) -> tuple[Any, ...] | list[Any]:
    """An :data:`ASGI_METHOD` call's ``(scope, first)``, from :func:`pack_http`'s form or as
    sent (a WebSocket's scope dict and receive messages)."""
    if len(args) != 1:
        return args
    (
        asgi,
        http_version,
        scheme,
        method,
        path,
        raw_path,
        query_string,
        root_path,
        headers,
        client,
        server,
        extensions,
        body,
        more_body,
    ) = args[0]
    scope = {
        "type": "http",
        "asgi": asgi,
        "http_version": http_version,
        "scheme": scheme,
        "method": method,
        "path": path,
        "raw_path": raw_path,
        "query_string": query_string,
        "root_path": root_path,
        "headers": headers,
        "client": client,
        "server": server,
    }
    if extensions is not None:
        scope["extensions"] = extensions
    if type(body) is not list:  # the common request: its whole body, or one chunk of it
        return scope, [{"type": "http.request", "body": body, "more_body": more_body}]
    last = len(body) - 1
    first = [
        {"type": "http.request", "body": chunk, "more_body": more_body or i < last}
        for i, chunk in enumerate(body)
    ]
    return scope, first


def ingress(app: Any) -> Callable[..., Any]:
    """Serve ``app`` (a FastAPI app or any ASGI app, or a function that builds one) as the
    HTTP interface of the decorated deployment class, as Ray's ``serve.ingress``.

    Routes declared on the class's methods (``@app.get("/") def root(self): ...``) run on the
    replica's instance. Use it under ``@serve.deployment``::

        app = FastAPI()

        @serve.deployment
        @serve.ingress(app)
        class MyFastAPIDeployment:
            @app.get("/")
            def root(self):
                return "Hello, world!"
    """
    if not callable(app):
        raise TypeError(
            f"serve.ingress expects an ASGI app (such as a FastAPI app) or a function that "
            f"returns one, got {type(app).__name__}."
        )

    def decorator(cls: Any = None) -> Any:
        if cls is None:  # serve.ingress(app)(): a deployment class with only the app, as Ray

            class ASGIIngressDeployment:
                """Keeps what it is bound with (a builder's routes may use it)."""

                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    self.args = args
                    self.kwargs = kwargs

            cls = ASGIIngressDeployment
        if not inspect.isclass(cls):  # Ray's words first
            raise ValueError(
                "@serve.ingress must be used with a class. Put it under @serve.deployment, "
                f"on a class; got {type(cls).__name__}."
            )
        if "__call__" in _own_attributes(cls):
            raise ValueError(
                "Classes passed to @serve.ingress may not have __call__ method. The ASGI app "
                f"answers HTTP requests for {cls.__name__}: remove its __call__."
            )
        _resolve_annotations(app, cls)
        # As Ray: the app as it is now (a builder function is called in the replica). Routes
        # added to it later, or by another class decorated with it, are not this class's.
        setattr(cls, APP_ATTRIBUTE, app if inspect.isfunction(app) else Frozen(app))
        return cls

    return decorator


def _own_attributes(cls: type) -> set[str]:
    """Names defined by the class or its bases, ``object`` and ``type`` aside."""
    return {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}


def _resolve_annotations(app: Any, cls: type) -> None:
    """Turn the string annotations of the class's route methods (``from __future__ import
    annotations``) into the objects they name, here where the module's globals are: code
    pickled by value reaches the replica without the globals only an annotation mentions, and
    FastAPI reads the annotations again there."""
    prefix = cls.__qualname__ + "."
    for route in getattr(app, "routes", ()):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None or not getattr(endpoint, "__qualname__", "").startswith(prefix):
            continue
        try:
            endpoint.__annotations__ = typing.get_type_hints(endpoint, include_extras=True)
        except Exception:  # an annotation that does not resolve stays as it is
            continue


def asgi_app_of(target: Any) -> Any | None:
    """The ASGI app a deployment's class was given by ``serve.ingress``, if any."""
    return asgi_app_of_class(type(target))


def has_asgi_app(cls: Any) -> bool:
    """Whether ``serve.ingress`` decorated the class (without unpickling its app)."""
    return inspect.isclass(cls) and getattr(cls, APP_ATTRIBUTE, None) is not None


def asgi_app_of_class(cls: Any) -> Any | None:
    """The ASGI app (or app builder) ``serve.ingress`` gave a class, if any."""
    found = getattr(cls, APP_ATTRIBUTE, None) if inspect.isclass(cls) else None
    return found.get() if isinstance(found, Frozen) else found
