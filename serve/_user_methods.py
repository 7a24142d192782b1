"""Finding the method a request names on a deployment's object: shared by replicas and local
testing mode, so both accept and refuse the same names with the same error."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from serve.exceptions import ServeError


def available_methods(target: Any, is_function: bool = False) -> list[str]:
    """The names a request may call: public methods, and ``__call__`` where defined."""
    if is_function:
        return ["__call__"]
    cls = type(target)
    names = []
    for name in dir(cls):  # lists __call__ only if the class (not type) defines it
        if name.startswith("_") and name != "__call__":
            continue
        if callable(inspect.getattr_static(cls, name, None)):
            names.append(name)
    return sorted(names)


def user_method(
    target: Any, name: str, deployment: str, is_function: bool = False
) -> Callable[..., Any]:
    """The bound method (or the function) a request for ``name`` runs; ServeError naming the
    available ones if there is no such method. Private names are never callable."""
    found: Any = None
    if is_function:
        if name == "__call__":
            found = target
    elif name == "__call__" or not name.startswith("_"):
        found = getattr(target, name, None)
    if found is None or not callable(found):
        raise ServeError(
            f"Tried to call a method '{name}' that does not exist on deployment "
            f"'{deployment}'. Available methods: {available_methods(target, is_function)}."
        )
    return found  # type: ignore[no-any-return]
