"""Ray 2.60's extension-point configs: ``RequestRouterConfig``, ``AutoscalingPolicy``,
``AggregationFunction`` and ``ControllerOptions`` (re-exported by ``serve.config``).

A router class or policy given by path (``"module:Name"``) or as the object itself is imported
here, in the process that configures it, and carried by value (see ``serve._import_path``), so
the processes that run it need not import the user's module.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from serve._import_path import dumps_by_value, import_attr, loads_by_value, normalize_path, path_of

DEFAULT_REQUEST_ROUTER_PATH = "serve.request_router:PowerOfTwoChoicesRequestRouter"
DEFAULT_AUTOSCALING_POLICY_NAME = "serve.autoscaling_policy:default_autoscaling_policy"
# Ray's spellings of the defaults (and their older module paths).
_DEFAULT_ROUTER_ALIASES = frozenset(
    {
        DEFAULT_REQUEST_ROUTER_PATH,
        "serve.request_router.PowerOfTwoChoicesRequestRouter",
        "serve._private.request_router:PowerOfTwoChoicesRequestRouter",
        "serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
        "serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter",
        "serve.request_router._pow2:PowerOfTwoChoicesRequestRouter",
    }
)
_DEFAULT_POLICY_ALIASES = frozenset(
    {
        DEFAULT_AUTOSCALING_POLICY_NAME,
        "serve.autoscaling_policy:replica_queue_length_autoscaling_policy",
        "serve.autoscaling_policy.default_autoscaling_policy",
        "serve.autoscaling_policy.replica_queue_length_autoscaling_policy",
    }
)
DEFAULT_REQUEST_ROUTING_STATS_PERIOD_S = 10.0
DEFAULT_REQUEST_ROUTING_STATS_TIMEOUT_S = 30.0
# Backoff between routing passes that found no replica with room (serve's defaults).
DEFAULT_INITIAL_BACKOFF_S = 0.025
DEFAULT_BACKOFF_MULTIPLIER = 2.0
DEFAULT_MAX_BACKOFF_S = 0.5


def reject_unknown(what: str, given: Any, valid: Any) -> None:
    """ValueError naming the keys of ``given`` that are not ``valid`` (private ones unlisted)."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        listed = sorted(v for v in valid if not v.startswith("_"))
        raise ValueError(f"{what}: unknown field(s) {unknown}; valid fields are {listed}.")


def _json_kwargs(what: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{what} must be a dict with string keys, got {value!r}.")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable: {exc}.") from exc
    return dict(value)


def _positive(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}.")
    if value <= 0:
        raise ValueError(f"{what} must be > 0, got {value}.")
    return float(value)


def _resolve(
    given: Any, what: str, default: str, default_aliases: frozenset[str]
) -> tuple[str, str]:
    """(import path, by-value pickle) of a class/function given by path or as itself; the
    pickle is empty for the built-in default."""
    if callable(given) and not isinstance(given, str):
        path, obj = path_of(given), given
    elif isinstance(given, str):
        path = normalize_path(given)
        obj = None if path in default_aliases else import_attr(path, what)
    else:
        raise TypeError(f"{what} must be a class, a function or an import path, got {given!r}.")
    if path in default_aliases:
        return default, ""
    return path, dumps_by_value(obj)


# The private field holding the by-value pickle of each config's class or function.
_PICKLED_FIELD = {
    "request_router_class": "_serialized_request_router_cls",
    "policy_function": "_serialized_policy_def",
}


def _resolve_into(config: Any, field: str, default: str, aliases: frozenset[str]) -> None:
    """Set ``config.<field>`` to the import path of what it names and its pickle field to the
    pickle (left alone when restored from the store or the wire, pickle included)."""
    pickled_field = _PICKLED_FIELD[field]
    if getattr(config, pickled_field):
        return
    path, pickled = _resolve(getattr(config, field) or default, field, default, aliases)
    object.__setattr__(config, field, path)
    object.__setattr__(config, pickled_field, pickled)


@dataclasses.dataclass(frozen=True)
class RequestRouterConfig:
    """How handles of a deployment pick replicas (Ray's ``RequestRouterConfig``).

    ``request_router_class`` (a ``serve.request_router.RequestRouter`` subclass, or its import
    path) runs in every process that routes to the deployment; ``request_router_kwargs`` go to
    its ``initialize_state``. Replicas whose class defines ``record_routing_stats()`` report it
    every ``request_routing_stats_period_s`` (bounded by ``request_routing_stats_timeout_s``);
    routers see it as ``RunningReplica.routing_stats``. A request that finds no replica with
    room is retried after ``initial_backoff_s``, growing by ``backoff_multiplier`` up to
    ``max_backoff_s`` (the first retry is immediate).

    Example::

        @serve.deployment(request_router_config=RequestRouterConfig(
            request_router_class="my_routers:StickyRouter",
            request_router_kwargs={"key": "user"},
        ))
        class Model: ...
    """

    request_router_class: Any = DEFAULT_REQUEST_ROUTER_PATH
    request_router_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    request_routing_stats_period_s: float = DEFAULT_REQUEST_ROUTING_STATS_PERIOD_S
    request_routing_stats_timeout_s: float = DEFAULT_REQUEST_ROUTING_STATS_TIMEOUT_S
    initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S
    backoff_multiplier: float = DEFAULT_BACKOFF_MULTIPLIER
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    _serialized_request_router_cls: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(
            self,
            "request_router_kwargs",
            _json_kwargs("request_router_kwargs", self.request_router_kwargs),
        )
        for name in (
            "request_routing_stats_period_s",
            "request_routing_stats_timeout_s",
            "initial_backoff_s",
            "backoff_multiplier",
            "max_backoff_s",
        ):
            set_(self, name, _positive(name, getattr(self, name)))
        if self.backoff_multiplier < 1:
            raise ValueError(
                f"backoff_multiplier must be >= 1 (the backoff never shrinks), got "
                f"{self.backoff_multiplier}."
            )
        _resolve_into(
            self, "request_router_class", DEFAULT_REQUEST_ROUTER_PATH, _DEFAULT_ROUTER_ALIASES
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (a config file's ``request_router_config``)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.name.startswith("_")
        }

    @property
    def is_default(self) -> bool:
        """Routing by power of two choices (no custom class)."""
        return not self._serialized_request_router_cls

    def get_request_router_class(self) -> Any:
        """The router class (unpickled; imports what it needs)."""
        if self.is_default:
            return import_attr(DEFAULT_REQUEST_ROUTER_PATH, "request_router_class")
        try:
            return loads_by_value(self._serialized_request_router_cls)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"Failed to deserialize custom request router {self.request_router_class!r}: "
                f"{exc}. The router depends on a module this process cannot import; install "
                "it (or put it on PYTHONPATH) where the deployment's handles run."
            ) from exc

    @classmethod
    def from_value(cls, value: Any) -> RequestRouterConfig:
        if isinstance(value, RequestRouterConfig):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"request_router_config must be a dict or RequestRouterConfig, got "
                f"{type(value).__name__}."
            )
        reject_unknown("request_router_config", value, {f.name for f in dataclasses.fields(cls)})
        return cls(**value)


@dataclasses.dataclass(frozen=True)
class AutoscalingPolicy:
    """A custom autoscaling policy (Ray's ``AutoscalingPolicy``), run by the controller.

    ``policy_function`` is a function ``(AutoscalingContext) -> (replicas, policy_state)`` or a
    class whose instances are such callables (built once, with ``policy_kwargs``); for an
    application-level policy it takes and returns dicts keyed by deployment id. Given by
    import path (``"module:name"``) or as the object itself.

    Example::

        autoscaling_config={"min_replicas": 1, "max_replicas": 4,
                            "policy": {"policy_function": "policies:by_queue_depth"}}
    """

    policy_function: Any = DEFAULT_AUTOSCALING_POLICY_NAME
    policy_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    _serialized_policy_def: str = dataclasses.field(default="", repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "policy_kwargs", _json_kwargs("policy_kwargs", self.policy_kwargs))
        _resolve_into(
            self, "policy_function", DEFAULT_AUTOSCALING_POLICY_NAME, _DEFAULT_POLICY_ALIASES
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (a config file's ``policy``)."""
        return {"policy_function": self.policy_function, "policy_kwargs": self.policy_kwargs}

    def is_default_policy_function(self) -> bool:
        return not self._serialized_policy_def

    def get_policy(self) -> Callable[..., Any]:
        """The policy function or class (unpickled)."""
        if self.is_default_policy_function():
            policy: Callable[..., Any] = import_attr(
                DEFAULT_AUTOSCALING_POLICY_NAME, "policy_function"
            )
            return policy
        try:
            loaded: Callable[..., Any] = loads_by_value(self._serialized_policy_def)
        except (ImportError, AttributeError) as exc:
            raise ImportError(
                f"Failed to deserialize custom autoscaling policy {self.policy_function!r}: "
                f"{exc}. The policy depends on a module the controller cannot import; install "
                "it (or put it on PYTHONPATH) where serve-controller runs."
            ) from exc
        return loaded

    @classmethod
    def from_value(cls, value: Any, what: str = "policy") -> AutoscalingPolicy:
        if isinstance(value, AutoscalingPolicy):
            return value
        if isinstance(value, str) or callable(value):
            return cls(policy_function=value)
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{what} must be a dict or AutoscalingPolicy, got {type(value).__name__}."
            )
        data = dict(value)
        if "name" in data:  # Ray's earlier spelling of policy_function
            data.setdefault("policy_function", data.pop("name"))
        reject_unknown(what, data, {f.name for f in dataclasses.fields(cls)})
        return cls(**data)


class AggregationFunction(enum.StrEnum):
    """How a metric's samples over the look-back window become one value (Ray's names)."""

    MEAN = "mean"
    MAX = "max"
    MIN = "min"


# ControllerOptions.runtime_env accepts env_vars only, as Ray's v0 scope: the other keys would
# change serve's own environment.
_CONTROLLER_RUNTIME_ENV_KEYS = frozenset({"env_vars"})


@dataclasses.dataclass(frozen=True)
class ControllerOptions:
    """Options of the serve controller process (Ray's ``ControllerOptions``).

    ``runtime_env={"env_vars": {...}}`` sets environment variables of a controller that
    ``serve.start`` / ``serve.run`` starts (its replicas and proxy inherit them); a controller
    that already runs keeps its own, with a warning.
    """

    runtime_env: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        env = self.runtime_env
        if env is None:
            return
        if not isinstance(env, Mapping):
            raise TypeError(f"controller_options.runtime_env must be a dict, got {env!r}.")
        unknown = sorted(set(env) - _CONTROLLER_RUNTIME_ENV_KEYS)
        if unknown:
            raise ValueError(
                f"controller_options.runtime_env field(s) {unknown} are not allowed: only "
                "env_vars may be set for the controller. Put pip, working_dir and the like in "
                "a deployment's ray_actor_options['runtime_env'] instead."
            )
        env_vars = env.get("env_vars") or {}
        if not isinstance(env_vars, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
        ):
            raise TypeError(
                "controller_options.runtime_env['env_vars'] must be a dict of strings to "
                f"strings, got {env_vars!r}."
            )
        object.__setattr__(self, "runtime_env", {"env_vars": dict(env_vars)})

    @property
    def env_vars(self) -> dict[str, str]:
        return dict((self.runtime_env or {}).get("env_vars") or {})

    @classmethod
    def from_value(cls, value: Any) -> ControllerOptions:
        if value is None:
            return cls()
        if isinstance(value, ControllerOptions):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"controller_options must be a dict or ControllerOptions, got "
                f"{type(value).__name__}."
            )
        unknown = sorted(set(value) - {"runtime_env"})
        if unknown:
            raise ValueError(
                f"Unknown controller_options field(s) {unknown}; known: ['runtime_env']."
            )
        return cls(**value)
