"""Snapshots made by pickling: ``Frozen`` holds a value as it was when frozen.

``serve.ingress`` freezes its app when it decorates a class, as Ray serializes it then, so
routes added to the app later (or by another deployment's class) do not change what this
deployment serves. The app travels inside its class as these bytes, unpickled where it runs. A
lock met on the way (a FastAPI app's included routers hold one) guards state of the process it
lives in: the replica gets a fresh, unlocked one. (The class's own attributes are pickled as
they are: a lock there fails at decoration, as in Ray.)
"""

from __future__ import annotations

import copyreg
import io
import sys
import threading
from collections import ChainMap
from typing import Any

import cloudpickle

LOCK_REDUCERS: dict[type, Any] = {
    type(threading.Lock()): lambda lock: (threading.Lock, ()),
    type(threading.RLock()): lambda lock: (threading.RLock, ()),
}

_Pickler = type(
    "_FreezingPickler",
    (cloudpickle.Pickler,),
    {"dispatch_table": ChainMap(LOCK_REDUCERS, cloudpickle.Pickler.dispatch_table)},
)


def register_starlette_state() -> None:
    """Starlette's ``State`` (in every FastAPI app) unpickles into endless recursion: its
    ``__getattr__`` reads ``_state`` before it exists. Pickle it by its contents instead, once
    Starlette is loaded (an app given to ``serve.ingress`` travels with its class)."""
    module = sys.modules.get("starlette.datastructures")
    state = getattr(module, "State", None)
    if state is not None and state not in copyreg.dispatch_table:
        copyreg.pickle(state, lambda s: (state, (dict(s._state),)))


class Frozen:
    """``value`` as it was when frozen; pickles as those bytes, unpickled on first use."""

    __slots__ = ("_payload", "_value")

    def __init__(self, value: Any) -> None:
        register_starlette_state()
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=5).dump(value)
        self._payload = buffer.getvalue()
        self._value: Any = None

    def get(self) -> Any:
        if self._value is None:
            register_starlette_state()
            self._value = cloudpickle.loads(self._payload)
        return self._value

    def __reduce__(self) -> tuple[Any, ...]:
        return (_thaw, (self._payload,))


def _thaw(payload: bytes) -> Frozen:
    frozen = Frozen.__new__(Frozen)
    frozen._payload = payload
    frozen._value = None
    return frozen
