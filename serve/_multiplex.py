"""Model multiplexing: ``@serve.multiplexed`` loaders with a per-replica LRU cache.

Each replica keeps at most ``max_num_models_per_replica`` models per loader; loading one more
evicts the least recently used, calling its ``__del__``. Loads are serialized, so concurrent
requests for one id load it once. The ids a replica holds or is loading are pushed to the
controller as soon as they change, so routers send a model's requests where it already is.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from serve._context import replica_context
from serve._signature import check_one_input

logger = logging.getLogger(__name__)


class _Registry:
    """Every model id this replica holds or is loading, across loaders."""

    def __init__(self) -> None:
        self._caches: list[_ModelCache] = []
        self._listener: Callable[[frozenset[str]], None] | None = None
        self._last: frozenset[str] = frozenset()

    def add(self, cache: _ModelCache) -> None:
        self._caches.append(cache)

    def model_ids(self) -> frozenset[str]:
        ids: set[str] = set()
        for cache in self._caches:
            ids.update(cache.models)
            ids.update(cache.loading)
        return frozenset(ids)

    def set_listener(self, listener: Callable[[frozenset[str]], None] | None) -> None:
        self._listener = listener

    def changed(self) -> None:
        ids = self.model_ids()
        if ids != self._last:
            self._last = ids
            if self._listener is not None:
                self._listener(ids)

    async def unload_all(self) -> None:
        for cache in self._caches:
            await cache.unload_all()
        self._caches.clear()


registry = _Registry()


def _reference(owner: Any) -> Callable[[], Any]:
    """A weak reference to ``owner`` where possible (a strong one otherwise)."""
    try:
        return weakref.ref(owner)
    except TypeError:
        return lambda: owner


class _ModelCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.loading: set[str] = set()
        self._lock = asyncio.Lock()

    async def get(self, model_id: str, load: Callable[[], Awaitable[Any]]) -> Any:
        if not isinstance(model_id, str):
            raise TypeError(f"A multiplexed model id must be a string, got {model_id!r}.")
        if not model_id:
            raise ValueError("A multiplexed model id must not be empty.")
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        self.loading.add(model_id)
        registry.changed()  # routers learn about a model while it loads
        try:
            async with self._lock:
                if model_id in self.models:
                    self.models.move_to_end(model_id)
                    return self.models[model_id]
                if self.limit != -1:
                    while len(self.models) >= self.limit:
                        _, evicted = self.models.popitem(last=False)
                        await _unload(evicted)
                model = await load()
                self.models[model_id] = model
                return model
        finally:
            self.loading.discard(model_id)
            registry.changed()

    async def unload_all(self) -> None:
        while self.models:
            _, model = self.models.popitem(last=False)
            await _unload(model)


async def _unload(model: Any) -> None:
    """Call the model's ``__del__`` now (as Ray does), async or in a thread, exactly once."""
    cls = type(model)
    deleter = getattr(cls, "__del__", None)
    if deleter is None:
        return
    if inspect.iscoroutinefunction(deleter):
        await deleter(model)
    else:
        await asyncio.get_running_loop().run_in_executor(None, deleter, model)
    try:  # the garbage collector must not run it a second time
        model.__class__ = _without_del(cls)
    except TypeError:
        pass  # a class whose instances cannot change class (builtin or __slots__ layout)


_WITHOUT_DEL: dict[type, type] = {}


def _without_del(cls: type) -> type:
    quiet = _WITHOUT_DEL.get(cls)
    if quiet is None:
        namespace = {"__del__": lambda self: None, "__module__": cls.__module__}
        quiet = _WITHOUT_DEL[cls] = type(cls.__name__, (cls,), namespace)
    return quiet


def multiplexed(func: Callable[..., Any] | None = None, max_num_models_per_replica: int = 3) -> Any:
    """Mark an async model loader: ``model = await self.get_model(model_id)`` caches per replica.

    Example::

        @serve.deployment
        class Models:
            @serve.multiplexed(max_num_models_per_replica=2)
            async def get_model(self, model_id: str):
                return await load(model_id)

            async def __call__(self, x):
                model = await self.get_model(serve.get_multiplexed_model_id())
                return model(x)
    """
    if isinstance(max_num_models_per_replica, bool) or not isinstance(
        max_num_models_per_replica, int
    ):
        raise TypeError(
            f"max_num_models_per_replica must be an integer, got {max_num_models_per_replica!r}."
        )
    if max_num_models_per_replica == 0 or max_num_models_per_replica < -1:
        raise ValueError(
            "max_num_models_per_replica must be positive, or -1 for no limit; got "
            f"{max_num_models_per_replica}."
        )

    def decorate(loader: Callable[..., Any]) -> _MultiplexedLoader:
        return _MultiplexedLoader(loader, max_num_models_per_replica)

    if func is not None:
        return decorate(func)
    return decorate


class _MultiplexedLoader:
    """The decorated loader. A module-level class, so cloudpickle ships it by reference and it
    finds this process's registry (a closure would carry a copy of it)."""

    def __init__(self, loader: Callable[..., Any], limit: int) -> None:
        if inspect.isclass(loader):
            raise TypeError("@serve.multiplexed decorates an async loader function, not a class.")
        if not inspect.iscoroutinefunction(loader):
            raise TypeError(
                f"@serve.multiplexed needs an async function; {loader.__qualname__} is not "
                "defined with `async def`."
            )
        self._is_method = check_one_input(loader, "@serve.multiplexed loader", "model id parameter")
        self._loader = loader
        self._limit = limit
        # id(owner) -> (a reference to the owner, its cache); models unload at shutdown
        self._caches: dict[int, tuple[Callable[[], Any], _ModelCache]] = {}
        functools.update_wrapper(self, loader)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_caches"] = {}  # models never travel between processes
        return state

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return functools.partial(self, instance)

    async def __call__(self, *args: Any) -> Any:
        if replica_context() is None:
            raise RuntimeError(
                f"{self._loader.__qualname__} is a @serve.multiplexed loader; it can only be "
                "used within a deployment."
            )
        owner = args[0] if self._is_method else None
        model_id = args[-1]
        key = id(owner)
        found = self._caches.get(key)
        # An id is reused once its object is gone: a cache belongs to the object that made it.
        if found is None or found[0]() is not owner:
            found = self._caches[key] = (_reference(owner), _ModelCache(self._limit))
            registry.add(found[1])
        cache = found[1]
        return await cache.get(model_id, lambda: self._loader(*args))
