"""Deployment and handle options: Ray Serve's names, defaults and validation, in one place.

Every option is checked when it is given (at decoration or ``options()`` time), so a typo or a
bad value fails where the user wrote it, not later in a replica.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from serve._logging import check_logging_config
from serve._models import DeploymentConfig, encode_user_config
from serve._serialization import CODEC_NAMES
from serve.config import AutoscalingConfig, RequestRouterConfig
from serve.gang import check_gang_fits, gang_option
from serve.request_router._base import router_class_of


class DEFAULT(enum.Enum):
    """Sentinel meaning "keep the current value" (Ray's ``DEFAULT.VALUE``)."""

    VALUE = 1


# Ray's actor options. num_cpus, num_gpus, memory and resources are the replica's resource
# request (the controller's launcher places and sizes replicas by them); runtime_env is applied
# by the replica; the others are validated for type and otherwise ignored.
_RAY_ACTOR_OPTION_KEYS = frozenset(
    {
        "runtime_env",
        "num_cpus",
        "num_gpus",
        "memory",
        "object_store_memory",
        "resources",
        "accelerator_type",
        "label_selector",
    }
)


def _bad(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"serve.deployment: {name} must be {expected}, got {value!r}.")


def _int(name: str, value: Any, *, minimum: int, allow: tuple[int, ...] = ()) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an integer", value)
    if value not in allow and value < minimum:
        extra = f" (or {', '.join(map(str, allow))})" if allow else ""
        raise ValueError(f"serve.deployment: {name} must be >= {minimum}{extra}, got {value}.")
    return value


def _float(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _bad(name, "a number", value)
    if positive and value <= 0:
        raise ValueError(f"serve.deployment: {name} must be > 0, got {value}.")
    if value < 0:
        raise ValueError(f"serve.deployment: {name} must be >= 0, got {value}.")
    return float(value)


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(name, "a string or None", value)
    return value


def _check_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad("name", "a non-empty string", value)
    if "#" in value:
        raise ValueError(f"serve.deployment: name must not contain '#', got {value!r}.")
    return value


def _check_num_replicas(value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    return _int("num_replicas", value, minimum=0)


def _check_user_config(value: Any) -> Any:
    if value is not None:
        encode_user_config(value)
    return value


def _check_autoscaling(value: Any) -> AutoscalingConfig | dict[str, Any] | None:
    """Keep a dict as given (num_replicas="auto" merges only the keys the user set)."""
    if value is None or isinstance(value, AutoscalingConfig):
        return value
    if not isinstance(value, Mapping):
        raise _bad("autoscaling_config", "a dict or AutoscalingConfig", value)
    AutoscalingConfig.check_keys(value)
    return dict(value)


def _check_actor_options(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _bad("ray_actor_options", "a dict", value)
    unknown = sorted(set(value) - _RAY_ACTOR_OPTION_KEYS)
    if unknown:
        raise ValueError(
            f"serve.deployment: ray_actor_options has unknown key(s) {unknown}; valid keys are "
            f"{sorted(_RAY_ACTOR_OPTION_KEYS)}."
        )
    checked = dict(value)
    for key in ("num_cpus", "num_gpus", "memory"):
        if checked.get(key) is not None:
            _float(f"ray_actor_options[{key!r}]", checked[key], positive=False)
    resources = checked.get("resources")
    if resources is not None:
        if not isinstance(resources, Mapping) or not all(isinstance(k, str) for k in resources):
            raise _bad("ray_actor_options['resources']", "a dict of name -> amount", resources)
        for name, amount in resources.items():
            _float(f"ray_actor_options['resources'][{name!r}]", amount, positive=False)
    if checked.get("runtime_env") is not None:
        checked["runtime_env"] = check_runtime_env(checked["runtime_env"])
    try:
        orjson.dumps(checked)
    except TypeError as exc:
        raise TypeError(
            f"serve.deployment: ray_actor_options must hold plain data (dicts, lists, strings, "
            f"numbers); {exc}."
        ) from exc
    return checked


# runtime_env fields honoured by replicas, and those refused because replicas run in the
# driver's own environment (nothing is installed or fetched for them).
_RUNTIME_ENV_HONOURED = frozenset({"env_vars", "working_dir", "py_modules", "config", "excludes"})
_RUNTIME_ENV_REFUSED = frozenset({"pip", "uv", "conda", "container", "image_uri", "py_executable"})


def check_runtime_env(value: Any) -> dict[str, Any]:
    """Ray's runtime_env, as far as it means something here: ``env_vars`` (set in the
    replica), a local ``working_dir`` (its working directory and first import path) and local
    ``py_modules`` (added to its import path). Installing packages is refused, not ignored."""
    if not isinstance(value, Mapping):
        raise _bad("runtime_env", "a dict", value)
    env = dict(value)
    refused = sorted(set(env) & _RUNTIME_ENV_REFUSED)
    if refused:
        raise ValueError(
            f"serve.deployment: runtime_env {refused} is not supported: replicas run in the "
            "driver's Python environment, which nothing installs into; install the packages "
            "there (pip install ...) and drop the field."
        )
    unknown = sorted(set(env) - _RUNTIME_ENV_HONOURED)
    if unknown:
        raise ValueError(
            f"serve.deployment: runtime_env has unknown or unsupported field(s) {unknown}; "
            f"supported: {sorted(_RUNTIME_ENV_HONOURED)}."
        )
    env_vars = env.get("env_vars")
    if env_vars is not None and not (
        isinstance(env_vars, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items())
    ):
        raise _bad("runtime_env['env_vars']", "a dict of strings to strings", env_vars)
    for key in ("working_dir",):
        path = env.get(key)
        if path is not None and not (isinstance(path, str) and "://" not in path):
            raise _bad(
                f"runtime_env['{key}']", "a local directory (remote URIs are not fetched)", path
            )
    modules = env.get("py_modules")
    if modules is not None and not (
        isinstance(modules, list | tuple)
        and all(isinstance(m, str) and "://" not in m for m in modules)
    ):
        raise _bad("runtime_env['py_modules']", "a list of local paths", modules)
    return env


# Ray's older spellings of request_router_config's fields, given to the decorator directly.
_ROUTER_SHORTHANDS = (
    "request_router_class",
    "request_router_kwargs",
    "request_routing_stats_period_s",
    "request_routing_stats_timeout_s",
)


def _check_router_config(value: Any) -> RequestRouterConfig | None:
    """Ray's request_router_config: a dict or RequestRouterConfig naming a RequestRouter."""
    if value is None:
        return None
    try:
        config = RequestRouterConfig.from_value(value)
    except (TypeError, ValueError, ImportError, AttributeError) as exc:
        raise type(exc)(f"serve.deployment: {exc}") from exc
    if not config.is_default:
        try:
            router_class_of(config)
        except TypeError as exc:
            raise TypeError(f"serve.deployment: {exc}") from exc
    return config


def _fraction(name: str, value: Any, *, low: float, high: float, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _bad(name, "a number", value)
    if (value <= low if low_open else value < low) or value > high:
        bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise ValueError(f"serve.deployment: {name} must be {bound}, got {value}.")
    return float(value)


def _check_label_selector(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(s, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in s.items())
        for s in value
    ):
        raise _bad(
            "placement_group_bundle_label_selector", "a list of dicts of strings to strings", value
        )
    return [dict(s) for s in value]


def _check_bundles(value: Any) -> Any:
    if value is not None and (
        not isinstance(value, list) or not all(isinstance(b, Mapping) for b in value)
    ):
        raise _bad("placement_group_bundles", "a list of dicts", value)
    if value is not None:
        if not value:
            raise ValueError("serve.deployment: placement_group_bundles must not be empty.")
        for bundle in value:
            if not any(amount for amount in bundle.values()):
                raise ValueError(
                    f"serve.deployment: placement_group_bundles {value!r} has a bundle with "
                    "all zero resources; give every bundle some resource, or drop it."
                )
    return value


def check_route_prefix(value: Any) -> str | None:
    """Ray's rules: None (not served over HTTP) or a path starting with '/', no trailing '/'
    (except '/' itself), no wildcards."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"route_prefix must be a string or None, got {value!r}.")
    if not value.startswith("/"):
        raise ValueError(f"Invalid route_prefix '{value}', must start with a forward slash ('/').")
    if value != "/" and value.endswith("/"):
        raise ValueError(f"Invalid route_prefix '{value}', may not end with a trailing '/'.")
    if "{" in value or "}" in value:
        raise ValueError(f"Invalid route_prefix '{value}', may not contain wildcards.")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "name": _check_name,
    "version": lambda v: _optional_str("version", v),
    "num_replicas": _check_num_replicas,
    "route_prefix": check_route_prefix,
    "ray_actor_options": _check_actor_options,
    "placement_group_bundles": _check_bundles,
    "placement_group_strategy": lambda v: _optional_str("placement_group_strategy", v),
    "max_replicas_per_node": lambda v: (
        None if v is None else _int("max_replicas_per_node", v, minimum=1)
    ),
    "user_config": _check_user_config,
    "max_ongoing_requests": lambda v: _int("max_ongoing_requests", v, minimum=1),
    "max_queued_requests": lambda v: _int("max_queued_requests", v, minimum=1, allow=(-1,)),
    "autoscaling_config": _check_autoscaling,
    "graceful_shutdown_wait_loop_s": lambda v: _float(
        "graceful_shutdown_wait_loop_s", v, positive=False
    ),
    "graceful_shutdown_timeout_s": lambda v: _float(
        "graceful_shutdown_timeout_s", v, positive=False
    ),
    "health_check_period_s": lambda v: _float("health_check_period_s", v, positive=True),
    "health_check_timeout_s": lambda v: _float("health_check_timeout_s", v, positive=True),
    "logging_config": lambda v: check_logging_config(v),
    "request_router_config": _check_router_config,
    "max_constructor_retry_count": lambda v: _int("max_constructor_retry_count", v, minimum=1),
    "rolling_update_percentage": lambda v: _fraction(
        "rolling_update_percentage", v, low=0.0, high=1.0, low_open=True
    ),
    "max_surge_percent": lambda v: _fraction(
        "max_surge_percent", v, low=0.0, high=100.0, low_open=False
    ),
    "placement_group_bundle_label_selector": _check_label_selector,
    "gang_scheduling_config": gang_option,
}

DEPLOYMENT_OPTION_NAMES = frozenset(_CHECKS)


def validate_deployment_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check each given option (DEFAULT entries are dropped) and return the normalized values."""
    out: dict[str, Any] = {}
    shorthand = {
        k: options[k]
        for k in _ROUTER_SHORTHANDS
        if k in options and options[k] is not DEFAULT.VALUE
    }
    for key, value in options.items():
        if value is DEFAULT.VALUE or key in _ROUTER_SHORTHANDS:
            continue
        if key not in _CHECKS:
            raise TypeError(
                f"serve.deployment got an unexpected option {key!r}; valid options are "
                f"{sorted(_CHECKS)}."
            )
        out[key] = _CHECKS[key](value)
    if shorthand:
        if out.get("request_router_config") is not None:
            raise ValueError(
                f"serve.deployment: {sorted(shorthand)} and request_router_config were both "
                "given; put them in request_router_config only."
            )
        out["request_router_config"] = _check_router_config(shorthand)
    if out.get("placement_group_bundles") is not None and out.get("max_replicas_per_node"):
        raise ValueError(
            "serve.deployment: Setting max_replicas_per_node is not allowed when "
            "placement_group_bundles is provided. Use one of them."
        )
    return out


def build_deployment_config(options: Mapping[str, Any]) -> DeploymentConfig:
    """Turn validated options into a DeploymentConfig (resolving num_replicas="auto")."""
    selector = options.get("placement_group_bundle_label_selector")
    if selector is not None:
        bundles = options.get("placement_group_bundles")
        if bundles is None or len(bundles) != len(selector):
            raise ValueError(
                "serve.deployment: placement_group_bundle_label_selector needs "
                "placement_group_bundles, one selector per bundle; got "
                f"{len(selector)} selector(s) for "
                f"{'no' if bundles is None else len(bundles)} bundle(s)."
            )
    num_replicas = options.get("num_replicas")
    given = options.get("autoscaling_config")
    autoscaling: AutoscalingConfig | None = None
    if num_replicas == "auto":
        if isinstance(given, AutoscalingConfig):
            autoscaling = given
        else:
            autoscaling = AutoscalingConfig.from_value(
                {**AutoscalingConfig.default().to_dict(), **(given or {})}
            )
        num_replicas = None
    elif given is not None:
        autoscaling = AutoscalingConfig.from_value(given)
        if num_replicas is not None:
            raise ValueError(
                "serve.deployment: manually setting num_replicas is not allowed when "
                "autoscaling_config is provided; remove one of them (or use "
                'num_replicas="auto").'
            )
    elif num_replicas is None:
        num_replicas = 1
    kwargs = {
        f.name: options[f.name]
        for f in dataclasses.fields(DeploymentConfig)
        if f.name in options and f.name not in ("num_replicas", "autoscaling_config")
    }
    check_gang_fits(
        kwargs.get("gang_scheduling_config"),
        num_replicas=num_replicas,
        replica_bounds=autoscaling.replica_bounds() if autoscaling is not None else None,
        max_replicas_per_node=kwargs.get("max_replicas_per_node"),
    )
    return DeploymentConfig(num_replicas=num_replicas, autoscaling_config=autoscaling, **kwargs)


@dataclasses.dataclass(frozen=True, slots=True)
class HandleOptions:
    """Per-call options of a DeploymentHandle (Ray's DynamicHandleOptions)."""

    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    stream: bool = False
    prefer_local_routing: bool = False
    by_reference: bool = False
    request_serialization: str = "cloudpickle"
    response_serialization: str = "cloudpickle"

    def copy_and_update(self, **changes: Any) -> HandleOptions:
        """A copy with the given (already validated) fields changed; DEFAULT keeps a field."""
        updates = {k: v for k, v in changes.items() if v is not DEFAULT.VALUE}
        if not updates:
            return self
        return dataclasses.replace(self, **updates)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"handle.options: {name} must be a bool, got {value!r}.")
    return value


def _codec(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"handle.options: {name} must be a string, got {value!r}.")
    lowered = value.lower()
    if lowered not in CODEC_NAMES:
        raise ValueError(
            f"Unsupported serialization method {value!r} for {name}; choose one of "
            f"{list(CODEC_NAMES)}."
        )
    return lowered


def validate_handle_options(
    *,
    method_name: Any,
    multiplexed_model_id: Any,
    stream: Any,
    use_new_handle_api: Any,
    prefer_local_routing: Any,
    by_reference: Any,
    request_serialization: Any,
    response_serialization: Any,
) -> dict[str, Any]:
    """Validate ``DeploymentHandle.options()`` arguments; DEFAULT means "unchanged"."""
    out: dict[str, Any] = {}
    if method_name is not DEFAULT.VALUE:
        if not isinstance(method_name, str) or not method_name:
            raise TypeError(
                f"handle.options: method_name must be a non-empty string, got {method_name!r}."
            )
        out["method_name"] = method_name
    if multiplexed_model_id is not DEFAULT.VALUE:
        if not isinstance(multiplexed_model_id, str):
            raise TypeError(
                f"handle.options: multiplexed_model_id must be a string, got "
                f"{multiplexed_model_id!r}."
            )
        out["multiplexed_model_id"] = multiplexed_model_id
    if stream is not DEFAULT.VALUE:
        out["stream"] = _bool("stream", stream)
    if use_new_handle_api is not DEFAULT.VALUE:
        _bool("use_new_handle_api", use_new_handle_api)
        warnings.warn(
            "use_new_handle_api no longer has any effect; DeploymentHandle always uses the new "
            "API.",
            DeprecationWarning,
            stacklevel=3,
        )
    if prefer_local_routing is not DEFAULT.VALUE:
        out["prefer_local_routing"] = _bool("_prefer_local_routing", prefer_local_routing)
    if by_reference is not DEFAULT.VALUE:
        out["by_reference"] = _bool("_by_reference", by_reference)
    if request_serialization is not DEFAULT.VALUE:
        out["request_serialization"] = _codec("request_serialization", request_serialization)
    if response_serialization is not DEFAULT.VALUE:
        out["response_serialization"] = _codec("response_serialization", response_serialization)
    return out
