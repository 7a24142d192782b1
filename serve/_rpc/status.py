"""Exceptions across the wire, in one place, both directions.

A user exception travels cloudpickled together with its formatted traceback, whatever the
response codec. The receiver re-raises the user's own type with a ``RemoteTraceback`` as its
``__cause__``; if the exception cannot be pickled or rebuilt, it gets a ``RemoteError`` carrying
the type name, message and traceback text instead.
"""

from __future__ import annotations

import pickle
import re
import traceback

import cloudpickle
import grpc

from serve._proto.common_pb2 import ErrorInfo
from serve._settings import settings
from serve.exceptions import (
    ControllerUnavailableError,
    RemoteError,
    RemoteTraceback,
    ServeError,
)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # user code's __str__ may raise anything; never let it escape
        return f"<unprintable {type(exc).__name__}>"


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    module = kind.__module__
    return (
        kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    )


def error_info(exc: BaseException, *, with_traceback: bool = True) -> ErrorInfo:
    """Describe an exception for the wire; never raises."""
    try:
        text = "".join(traceback.format_exception(exc)) if with_traceback else ""
    except BaseException:  # user code (__str__, __repr__) may raise anything here
        text = ""
    try:
        pickled = cloudpickle.dumps(exc)
    except BaseException:  # ... and in __reduce__: the text fields still describe it
        pickled = b""
    return ErrorInfo(
        type_name=_type_name(exc), message=_safe_str(exc), traceback=text, pickled=pickled
    )


def rebuild(info: ErrorInfo) -> BaseException:
    """The exception an ErrorInfo describes, with the remote traceback as its cause."""
    error: BaseException | None = None
    if info.pickled:
        try:
            loaded = pickle.loads(info.pickled)
        except BaseException:  # an exception class whose unpickling raises anything at all
            loaded = None
        if isinstance(loaded, BaseException):
            error = loaded
    if error is None:
        return RemoteError(info.type_name, info.message, info.traceback)
    if info.traceback:
        error.__cause__ = RemoteTraceback(info.traceback)
    return error


_TOO_BIG = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


def controller_error(exc: grpc.aio.AioRpcError, address: str, action: str) -> Exception:
    """Translate a failed controller RPC into the exception the SDK raises."""
    code = exc.code()
    details = exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = "Start one (`serve start` or serve-controller)"
        if settings().address:
            hint += ", or unset SERVE_ADDRESS to use an embedded one"
        return ControllerUnavailableError(
            f"Could not {action}: no serve controller answered at {address} ({details}). {hint}."
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ServeError(f"Could not {action}: the controller at {address} refused: {details}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        too_big = _TOO_BIG.search(details)
        if too_big:
            return ValueError(
                f"Could not {action}: the message is {too_big[1]} bytes, over the controller's "
                f"limit of {too_big[2]} (SERVE_MAX_MESSAGE_BYTES). Send less, or raise "
                "SERVE_MAX_MESSAGE_BYTES where serve-controller runs (replicas inherit it), up "
                "to 2 GiB - 1."
            )
        return ServeError(f"Could not {action}: {details}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(f"Could not {action}: {details}")
    if code == grpc.StatusCode.ALREADY_EXISTS:  # a route prefix another application serves
        return ServeError(f"Could not {action}: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return ServeError(details)
    return ServeError(f"Could not {action}: {code.name}: {details}")
