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
