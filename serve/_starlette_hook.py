"""``starlette.requests`` reachable after a bare ``import starlette``, as under ``ray.serve``.

``ray.serve`` imports ``starlette.requests`` itself, so Ray programs (Ray's own docs among them)
write ``import starlette`` and then annotate with ``starlette.requests.Request``. Importing it
here unconditionally would cost every program and replica about 30 ms; instead the submodule is
loaded when the program first imports ``starlette``, or at once if it already has.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

_PACKAGE = "starlette"
_SUBMODULE = "starlette.requests"


class _LoadRequestsWithStarlette:
    """A one-shot meta path finder: finds ``starlette`` as usual and makes its loader import
    ``starlette.requests`` right after the package itself. Never loads anything else."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        if fullname != _PACKAGE:
            return None
        _uninstall(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return None  # not a plain installed package: imported as usual, without the hook
        exec_package = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            exec_package(module)
            _load_submodule()

        loader.exec_module = exec_module  # this loader instance serves starlette alone
        return spec


def _load_submodule() -> None:
    try:
        importlib.import_module(_SUBMODULE)
    except ImportError:  # a partial install: the program gets what starlette itself offers
        pass


def _uninstall(finder: _LoadRequestsWithStarlette) -> None:
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def install() -> None:
    if _PACKAGE in sys.modules:
        _load_submodule()
    elif not any(isinstance(f, _LoadRequestsWithStarlette) for f in sys.meta_path):
        sys.meta_path.insert(0, _LoadRequestsWithStarlette())
