"""The four payload codecs (``cloudpickle``, ``pickle``, ``msgpack``, ``orjson``).

Args and kwargs are encoded separately with the handle's ``request_serialization``; results and
stream items with its ``response_serialization``. A value a codec cannot carry raises a
``TypeError`` naming the codec and the type, before anything is sent. Exceptions never go through
these codecs (see ``serve/_rpc/status.py``).

What survives a round trip: cloudpickle and pickle keep Python types (pickle needs importable
classes); msgpack keeps None/bool/int/float/str/bytes/list/dict (tuples come back as lists);
orjson keeps JSON types (no bytes; tuples come back as lists; dict keys must be strings).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from typing import Any, Final

import cloudpickle
import msgpack
import orjson

from serve._frozen import register_starlette_state
from serve.exceptions import ServeError

CODEC_NAMES: Final = ("cloudpickle", "pickle", "msgpack", "orjson")
CLOUDPICKLE: Final = 0
PICKLE: Final = 1
MSGPACK: Final = 2
ORJSON: Final = 3
CODEC_IDS: Final = {name: i for i, name in enumerate(CODEC_NAMES)}
# Buffers at least this large travel out of band (their own gRPC message): never copied into a
# pickle stream or a batch by the sender, and handed to the receiver's unpickler as received.
OOB_MIN_BYTES: Final = 256 * 1024

_PLAIN_TYPES: Final = frozenset({str, bytes, int, float, bool, type(None)})
_ORJSON_OPTIONS: Final = orjson.OPT_SERIALIZE_NUMPY


def codec_id(name: str) -> int:
    try:
        return CODEC_IDS[name]
    except KeyError as exc:
        raise ValueError(
            f"Unsupported serialization method {name!r}; choose one of {list(CODEC_NAMES)}."
        ) from exc


def _is_plain(value: Any) -> bool:
    """True for data the C pickler handles without cloudpickle's by-value machinery."""
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return True
    if kind is tuple or kind is list:
        return all(type(v) in _PLAIN_TYPES for v in value)
    if kind is dict:
        return all(type(k) in _PLAIN_TYPES and type(v) in _PLAIN_TYPES for k, v in value.items())
    return False


class Unencodable(TypeError):
    """A value that could not be encoded: a type a codec cannot carry (raised by msgpack's and
    orjson's ``default`` hook, with the type's name as ``kind``), or a reply a replica could not
    encode. Whoever catches it reports a plain ``TypeError`` with its message.
    """

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.kind = kind


def _not_serializable(obj: Any) -> Any:
    """The msgpack / orjson hook for types they cannot carry. A type may refuse with a reason of
    its own (``__serve_unserializable__``, as DeploymentResponse does)."""
    reason = getattr(type(obj), "__serve_unserializable__", None)
    if isinstance(reason, str):
        raise ServeError(reason)
    kind = type(obj).__name__
    raise Unencodable(f"no {kind} in this format", kind)


_PICKLE_TYPE = re.compile(r"(?:cannot pickle|Can't pickle) '?<?(?:class )?'?([\w.<>]+)")


def _offending_type(value: Any, exc: BaseException) -> str:
    """The type that could not be encoded (often deep inside ``value``)."""
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, Unencodable) and error.kind:
            return error.kind
    found = _PICKLE_TYPE.search(str(exc))
    if found:
        return found.group(1).rsplit(".", 1)[-1]
    return type(value).__name__


def _encode_error(codec: int, value: Any, exc: Exception) -> TypeError:
    hint = (
        "use request_serialization/response_serialization 'cloudpickle' for arbitrary Python "
        "objects"
        if codec in (MSGPACK, ORJSON)
        else "make the value picklable or pass plain data"
    )
    return TypeError(
        f"The {CODEC_NAMES[codec]} codec cannot encode a value of type "
        f"{_offending_type(value, exc)}: {exc}; {hint}."
    )


def encode(codec: int, value: Any) -> bytes:
    """Encode one value; raises TypeError naming the codec and type if it cannot."""
    try:
        if codec == CLOUDPICKLE:
            if _is_plain(value):
                return pickle.dumps(value, protocol=5)
            return cloudpickle.dumps(value, protocol=5)  # type: ignore[no-any-return]
        if codec == PICKLE:
            return pickle.dumps(value, protocol=5)
        if codec == MSGPACK:
            return msgpack.packb(value, use_bin_type=True, default=_not_serializable)  # type: ignore[no-any-return]
        if codec == ORJSON:
            return orjson.dumps(value, default=_not_serializable, option=_ORJSON_OPTIONS)
    except ServeError:
        raise
    except RecursionError as exc:
        raise _encode_error(codec, value, exc) from exc
    except Exception as exc:
        raise _encode_error(codec, value, exc) from exc
    raise ValueError(f"Unknown codec id {codec}.")


def _is_big_bytes(value: Any) -> bool:
    return type(value) is bytes and len(value) >= OOB_MIN_BYTES


def _lift(value: Any) -> Any:
    """Wrap big top-level bytes (alone, or directly inside a tuple, list or dict) so pickle
    protocol 5 sends them out of band; pickle never does that for plain bytes by itself."""
    kind = type(value)
    if kind is bytes:
        return pickle.PickleBuffer(value) if len(value) >= OOB_MIN_BYTES else value
    if kind is tuple or kind is list:
        if any(_is_big_bytes(v) for v in value):
            return kind(pickle.PickleBuffer(v) if _is_big_bytes(v) else v for v in value)
    elif kind is dict and any(_is_big_bytes(v) for v in value.values()):
        return {k: pickle.PickleBuffer(v) if _is_big_bytes(v) else v for k, v in value.items()}
    return value


def encode_buffers(codec: int, value: Any) -> tuple[bytes, list[bytes]]:
    """Encode one value; with the pickle codecs, big buffers come back separately, uncopied."""
    if codec > PICKLE:
        return encode(codec, value), []
    kind = type(value)
    if kind in _PLAIN_TYPES and (kind is not bytes or len(value) < OOB_MIN_BYTES):
        return pickle.dumps(value, protocol=5), []  # a plain small value: nothing out of band
    buffers: list[bytes] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        view = buffer.raw()
        if view.nbytes < OOB_MIN_BYTES:
            return True  # small: keep it in the pickle stream
        owner = view.obj
        if isinstance(owner, bytes) and len(owner) == view.nbytes:
            buffers.append(owner)  # the caller's own bytes object: no copy
        else:
            buffers.append(view.tobytes())  # an array or a slice: gRPC needs bytes
        return False

    try:
        if codec == PICKLE or _is_plain(value):
            data = pickle.dumps(_lift(value), protocol=5, buffer_callback=out_of_band)
        else:
            data = cloudpickle.dumps(_lift(value), protocol=5, buffer_callback=out_of_band)
    except ServeError:
        raise
    except Exception as exc:
        raise _encode_error(codec, value, exc) from exc
    return data, buffers


def decode(codec: int, data: bytes | memoryview, buffers: list[bytes] | None = None) -> Any:
    """Decode one value encoded by :func:`encode` or :func:`encode_buffers`."""
    if codec in (CLOUDPICKLE, PICKLE):
        return pickle.loads(data, buffers=buffers)
    if codec == MSGPACK:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    if codec == ORJSON:
        return orjson.loads(data)
    raise ValueError(f"Unknown codec id {codec}.")


def _small_plain(values: tuple[Any, ...]) -> bool:
    """True for positional arguments that pickle in band as they are: plain values, no big
    bytes (which would go out of band). The common call, encoded with one C call."""
    for value in values:
        kind = type(value)
        if kind is bytes:
            if len(value) >= OOB_MIN_BYTES:
                return False
        elif kind not in _PLAIN_TYPES:
            return False
    return True


class EncodedArgs:
    """Positional and keyword arguments encoded separately (as Ray does), plus big buffers."""

    __slots__ = ("args", "args_buffer_count", "buffers", "kwargs")

    def __init__(self, codec: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not kwargs and codec <= PICKLE and _small_plain(args):
            # Plain values pickle the same with either codec, and with no buffer callback.
            self.args = pickle.dumps(args, protocol=5) if args else b""
            self.buffers: list[bytes] = []
            self.args_buffer_count = 0
            self.kwargs = b""
            return
        self.args = b""
        self.buffers = []
        if args:
            pickled = codec in (CLOUDPICKLE, PICKLE)
            self.args, self.buffers = encode_buffers(codec, args if pickled else list(args))
        self.args_buffer_count = len(self.buffers)
        self.kwargs = b""
        if kwargs:
            self.kwargs, kwargs_buffers = encode_buffers(codec, kwargs)
            self.buffers.extend(kwargs_buffers)


def encode_args(codec: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, bytes]:
    """Encode small positional and keyword arguments, all in band."""
    encoded = EncodedArgs(codec, args, kwargs)
    if encoded.buffers:
        raise ValueError("encode_args is for small arguments; use EncodedArgs.")
    return encoded.args, encoded.kwargs


def decode_args(
    codec: int,
    args: bytes | memoryview,
    kwargs: bytes | memoryview,
    buffers: list[bytes] | None = None,
    args_buffer_count: int = 0,
) -> tuple[tuple[Any, ...] | list[Any], dict[str, Any]]:
    args_buffers = buffers[:args_buffer_count] if buffers else None
    kwargs_buffers = buffers[args_buffer_count:] if buffers else None
    decoded_args = decode(codec, args, args_buffers) if len(args) else ()
    decoded_kwargs = decode(codec, kwargs, kwargs_buffers) if len(kwargs) else {}
    if not isinstance(decoded_args, tuple | list) or not isinstance(decoded_kwargs, dict):
        raise TypeError(
            f"Malformed request payload: args decoded to {type(decoded_args).__name__} and "
            f"kwargs to {type(decoded_kwargs).__name__}."
        )
    return decoded_args, decoded_kwargs


def _code_reducer() -> Any:
    """cloudpickle's code-object reducer, keeping the real file name.

    cloudpickle (3.1+) names by-value code ``<dynamic-code>``, which leaves remote tracebacks
    without file names or source lines; replicas run on hosts with the same files, so the real
    name is more useful. Falls back to cloudpickle's own behaviour if its internals change.
    """
    import types

    original = getattr(cloudpickle.cloudpickle, "_code_reduce", None)
    if original is None:
        return None

    def reduce(code: types.CodeType) -> Any:
        constructor, args = original(code)
        return constructor, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)

    return reduce


def _stable_class_ids() -> None:
    """Give classes pickled by value (from ``__main__``, or wrapped by @serve.deployment) a
    tracker id derived from their name instead of a random one.

    cloudpickle tags each such class with an id so that one process unpickles it once; a random
    id made the code bytes, and so the deployment's version, differ in every process, and every
    ``serve deploy`` restarted every replica. The id is the class's module and qualified name,
    plus how many classes of that name this process tagged before (classes made in a loop or a
    factory stay distinct). Falls back to cloudpickle's own ids if its internals change.
    """
    module = cloudpickle.cloudpickle
    lock = getattr(module, "_DYNAMIC_CLASS_TRACKER_LOCK", None)
    by_class = getattr(module, "_DYNAMIC_CLASS_TRACKER_BY_CLASS", None)
    by_id = getattr(module, "_DYNAMIC_CLASS_TRACKER_BY_ID", None)
    if lock is None or by_class is None or by_id is None:
        return
    seen: dict[str, int] = {}

    def tracker_id(class_def: type) -> str:
        with lock:
            found: str | None = by_class.get(class_def)
            if found is None:
                name = f"{class_def.__module__}.{class_def.__qualname__}"
                index = seen.get(name, 0)
                seen[name] = index + 1
                found = hashlib.sha256(f"{name}#{index}".encode()).hexdigest()[:32]
                by_class[class_def] = found
                by_id[found] = class_def
        return found

    if hasattr(module, "_get_or_create_tracker_id"):
        module._get_or_create_tracker_id = tracker_id


_stable_class_ids()
_code_pickler: Any = None


def dumps_code(value: Any) -> bytes:
    """cloudpickle a deployment's class or function (and its init args) for replicas."""
    global _code_pickler
    import io

    if _code_pickler is None:
        import types
        from collections import ChainMap

        reducer = _code_reducer()
        table = cloudpickle.Pickler.dispatch_table
        if reducer is not None:
            table = ChainMap({types.CodeType: reducer}, table)
        # The C pickler reads dispatch_table from the class when it is created.
        _code_pickler = type("_CodePickler", (cloudpickle.Pickler,), {"dispatch_table": table})
    register_starlette_state()
    buffer = io.BytesIO()
    _code_pickler(buffer, protocol=5).dump(value)
    return buffer.getvalue()
