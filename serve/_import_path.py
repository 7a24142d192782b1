"""User code named by an import path, and carried by value to the processes that run it.

Custom request routers run in every process that routes (drivers, replicas, the proxy) and
custom autoscaling policies in the controller; none of them necessarily has the user's modules
on its path. So, as Ray does, the class or function is imported where it is configured and
cloudpickled *by value* (its module's code travels with it), as base64 text so configs stay
plain JSON-able data (the controller's store writes them as JSON).
"""

from __future__ import annotations

import base64
import importlib
import sys
from typing import Any

import cloudpickle

# Ray's own paths name our modules: user code written for Ray keeps its strings.
_RAY_PREFIX = "ray.serve."


def normalize_path(path: str) -> str:
    """``ray.serve.x:y`` -> ``serve.x:y`` (Ray's built-ins are ours here)."""
    if path.startswith(_RAY_PREFIX):
        return "serve." + path[len(_RAY_PREFIX) :]
    return path


def path_of(obj: Any) -> str:
    """The import path (``module:qualname``) of a class or function."""
    return f"{obj.__module__}:{obj.__qualname__}"


def import_attr(path: str, what: str) -> Any:
    """Import ``module:attr`` or ``module.attr`` (as Ray's ``import_attr``).

    Raises ``ImportError`` when the module cannot be imported and ``AttributeError`` when it
    has no such attribute, naming ``what`` the path was for.
    """
    if not isinstance(path, str) or not path.strip():
        raise TypeError(f"{what} must be an import path such as 'module:name', got {path!r}.")
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r} must look like 'module:name' or 'module.name'.")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the working directory, as `python -m` and Ray's import_attr
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"{what} {path!r}: cannot import module {module_name!r} ({exc}); make it importable "
            "from the working directory or sys.path where the deployment is defined."
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise AttributeError(
                f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}."
            ) from exc
    return target


def dumps_by_value(obj: Any) -> str:
    """Cloudpickle ``obj`` with its defining module's code included (by reference when that
    cannot be done, e.g. for C code); base64 text."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    name = module.__name__ if module is not None else ""
    data = b""
    if (
        module is not None
        and name not in ("builtins", "__main__")
        and not name.startswith("serve.")
    ):
        cloudpickle.register_pickle_by_value(module)
        try:
            data = cloudpickle.dumps(obj)
        except Exception:
            data = b""  # not picklable by value: the processes that run it import it instead
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    if not data:
        data = cloudpickle.dumps(obj)
    return base64.b64encode(data).decode("ascii")


def loads_by_value(text: str) -> Any:
    """The object :func:`dumps_by_value` wrote."""
    return cloudpickle.loads(base64.b64decode(text))
