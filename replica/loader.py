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


def load_callable(serialized: bytes) -> Any:
    return pickle.loads(serialized)


def load_init_args(serialized: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = pickle.loads(serialized)
    return tuple(args), dict(kwargs)
