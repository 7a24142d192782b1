"""Building a deployment's object and finding the method a request names on it: shared by
replicas and local testing mode, so both build, accept and refuse the same way."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from serve.exceptions import ServeError


async def maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def build_target(
    target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, bool]:
    """(the object requests call, whether it is a function): a class is instantiated (its
    ``__init__`` may be ``async def``), a function is bound to its bind() arguments."""
    if inspect.isclass(target):
        init = getattr(target, "__init__", None)
        if init is not None and inspect.iscoroutinefunction(init):
            obj = target.__new__(target)
            await init(obj, *args, **kwargs)
            return obj, False
        return target(*args, **kwargs), False
    if args or kwargs:
        target = functools.partial(target, *args, **kwargs)
    return target, True


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
