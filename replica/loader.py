"""Rebuild the user's class or function and its constructor arguments in this process."""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

from serve._models import CodeEnv


def apply_code_env(env: CodeEnv) -> None:
    """Mirror the driver's working directory and import path, so its modules import here."""
    if env.cwd and os.path.isdir(env.cwd):
        os.chdir(env.cwd)
    mirrored = [p for p in env.sys_path if p]
    sys.path[:] = mirrored + [p for p in sys.path if p not in mirrored]


def apply_runtime_env(runtime_env: dict[str, Any] | None) -> None:
    """Ray's runtime_env as far as it applies to a process in the driver's environment:
    ``env_vars`` are set, ``working_dir`` becomes the working directory and the first import
    path, ``py_modules`` (local paths) are importable. Validated by the SDK already."""
    if not runtime_env:
        return
    os.environ.update(runtime_env.get("env_vars") or {})
    for module in runtime_env.get("py_modules") or ():
        path = os.path.abspath(module)
        parent = os.path.dirname(path) if os.path.isfile(path) or os.path.isdir(path) else path
        if parent not in sys.path:
            sys.path.insert(0, parent)
    working_dir = runtime_env.get("working_dir")
    if working_dir:
        path = os.path.abspath(working_dir)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"runtime_env working_dir {path!r} does not exist on this host; use a directory "
                "every host can read (a shared file system)."
            )
        os.chdir(path)
        sys.path.insert(0, path)


def load_callable(serialized: bytes) -> Any:
    return pickle.loads(serialized)


def load_init_args(serialized: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = pickle.loads(serialized)
    return tuple(args), dict(kwargs)
