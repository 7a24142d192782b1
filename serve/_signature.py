"""Signature checks shared by the decorators that wrap one-input user functions."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def check_one_input(func: Callable[..., Any], subject: str, expected: str) -> bool:
    """Check ``func`` takes exactly one input besides ``self``; return whether it is a method.

    ``subject`` names the decorated function in the error (``"@serve.batch function"``),
    ``expected`` names its one input (``"argument (the list of inputs)"``).
    """
    params = list(inspect.signature(func).parameters.values())
    is_method = bool(params) and params[0].name == "self"
    inputs = params[1:] if is_method else params
    if len(inputs) != 1:
        raise TypeError(
            f"{subject} {func.__qualname__} must take exactly one {expected}"
            f"{' besides self' if is_method else ''}; it takes {[p.name for p in inputs]}."
        )
    return is_method


def inputs_signature(func: Callable[..., Any]) -> tuple[inspect.Signature, bool]:
    """The signature of ``func`` without ``self``, and whether it is a method (``self`` first)."""
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    is_method = bool(params) and params[0].name == "self"
    if is_method:
        signature = signature.replace(parameters=params[1:])
    return signature, is_method


def transpose_calls(
    signature: inspect.Signature, calls: list[inspect.BoundArguments]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn calls of one input each into one call whose every argument is a list, one per call.

    A parameter no call passed is left out (the function's default applies); one some calls
    passed gets the default for the others. Extra ``*args`` are batched position by position
    and ``**kwargs`` key by key, so the calls must agree on how many and which there are.
    """
    merged: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if not any(name in call.arguments for call in calls):
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            counts = {len(call.arguments.get(name, ())) for call in calls}
            if len(counts) != 1:
                raise TypeError(
                    f"Calls batched together passed different numbers of extra positional "
                    f"arguments ({sorted(counts)}); pass the same number in every call."
                )
            rows = [call.arguments.get(name, ()) for call in calls]
            merged[name] = tuple([row[i] for row in rows] for i in range(counts.pop()))
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            keys = {tuple(sorted(call.arguments.get(name, {}))) for call in calls}
            if len(keys) != 1:
                raise TypeError(
                    f"Calls batched together passed different extra keyword arguments "
                    f"({sorted(keys)}); pass the same keywords in every call."
                )
            merged[name] = {
                key: [call.arguments.get(name, {})[key] for call in calls] for key in keys.pop()
            }
        else:
            merged[name] = [call.arguments.get(name, param.default) for call in calls]
    bound = inspect.BoundArguments(signature, merged)
    return bound.args, bound.kwargs
