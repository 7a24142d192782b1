"""Public configuration objects, as Ray Serve spells them: ``AutoscalingConfig`` (with its custom
``AutoscalingPolicy`` and the ``AutoscalingContext`` a policy sees), ``RequestRouterConfig``,
``ControllerOptions``, the proxy's ``HTTPOptions``, ``gRPCOptions`` and ``ProxyLocation``, and gang
scheduling's options (defined in ``serve.gang``)."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from collections.abc import Mapping
from typing import Any

from serve._autoscaling_context import AutoscalingContext, TimeStampedValue
from serve._extension_config import (
    AggregationFunction,
    AutoscalingPolicy,
    ControllerOptions,
    RequestRouterConfig,
    reject_unknown,
)
from serve.gang import GangPlacementStrategy, GangRuntimeFailurePolicy, GangSchedulingConfig

__all__ = [
    "AggregationFunction",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "BackpressureConfig",
    "ControllerOptions",
    "GangPlacementStrategy",
    "GangRuntimeFailurePolicy",
    "GangSchedulingConfig",
    "HTTPOptions",
    "ProxyLocation",
    "RequestRouterConfig",
    "TimeStampedValue",
    "gRPCOptions",
]

_LEGACY_TARGET_NAMES = ("target_num_ongoing_requests_per_replica", "target_num_ongoing_requests")


@dataclasses.dataclass(frozen=True)
class BackpressureConfig:
    """The HTTP answer to a request dropped because ``max_queued_requests`` is reached (Ray
    2.58's): ``status_code`` 503 (the default) or 429, and, with ``retry_after_s``, a
    ``Retry-After`` header of that many seconds, rounded up. A deployment that is unavailable
    (its deploy failed) still answers 503; over gRPC a dropped request is always
    RESOURCE_EXHAUSTED.

    Example::

        @serve.deployment(
            max_queued_requests=64,
            backpressure_config=BackpressureConfig(status_code=429, retry_after_s=5),
        )
        class Model: ...
    """

    status_code: int = 503
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.status_code, bool) or self.status_code not in (503, 429):
            raise ValueError(
                f"backpressure_config.status_code must be 503 or 429, got {self.status_code!r}."
            )
        retry = self.retry_after_s
        if retry is not None:
            if isinstance(retry, bool) or not isinstance(retry, int | float):
                raise TypeError(
                    f"backpressure_config.retry_after_s must be a number of seconds or None, "
                    f"got {retry!r}."
                )
            if not math.isfinite(retry) or retry < 0:
                raise ValueError(
                    f"backpressure_config.retry_after_s must be a finite number >= 0, got {retry}."
                )

    def to_dict(self) -> dict[str, Any]:
        return {"status_code": self.status_code, "retry_after_s": self.retry_after_s}

    @classmethod
    def from_value(cls, value: Any) -> BackpressureConfig:
        config: BackpressureConfig = _options_from(cls, value, "backpressure_config", frozenset())
        return config


@dataclasses.dataclass(frozen=True)
class AutoscalingConfig:
    """How a deployment scales between ``min_replicas`` and ``max_replicas``.

    Desired replicas = ceil(total ongoing requests / ``target_ongoing_requests``), clamped to the
    bounds, applied after ``upscale_delay_s`` / ``downscale_delay_s`` of agreement.

    Example::

        @serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
        class Model: ...
    """

    min_replicas: int = 1
    initial_replicas: int | None = None
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    smoothing_factor: float = 1.0
    upscale_smoothing_factor: float | None = None
    downscale_smoothing_factor: float | None = None
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    upscale_delay_s: float = 30.0
    aggregation_function: AggregationFunction = AggregationFunction.MEAN
    # The policy deciding the replica count; the default is Ray's request-based one.
    policy: AutoscalingPolicy = dataclasses.field(default_factory=AutoscalingPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", AutoscalingPolicy.from_value(self.policy))
        try:
            aggregation = AggregationFunction(str(self.aggregation_function).lower())
        except ValueError:
            raise ValueError(
                f"autoscaling_config: aggregation_function must be one of "
                f"{[a.value for a in AggregationFunction]}, got {self.aggregation_function!r}."
            ) from None
        object.__setattr__(self, "aggregation_function", aggregation)
        _check_int(self, "min_replicas", minimum=0)
        _check_int(self, "max_replicas", minimum=1)
        if self.initial_replicas is not None:
            _check_int(self, "initial_replicas", minimum=0)
        for name in ("target_ongoing_requests", "metrics_interval_s", "look_back_period_s"):
            _check_float(self, name, positive=True)
        for name in ("smoothing_factor",):
            _check_float(self, name, positive=True)
        for name in (
            "upscale_smoothing_factor",
            "downscale_smoothing_factor",
            "upscaling_factor",
            "downscaling_factor",
        ):
            if getattr(self, name) is not None:
                _check_float(self, name, positive=True)
        for name in ("downscale_delay_s", "upscale_delay_s"):
            _check_float(self, name, positive=False)
        if self.downscale_to_zero_delay_s is not None:
            _check_float(self, "downscale_to_zero_delay_s", positive=False)
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling_config: max_replicas ({self.max_replicas}) must be greater than "
                f"or equal to min_replicas ({self.min_replicas})."
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"autoscaling_config: initial_replicas ({self.initial_replicas}) must be between "
                f"min_replicas ({self.min_replicas}) and max_replicas ({self.max_replicas})."
            )

    @classmethod
    def default(cls) -> AutoscalingConfig:
        """The profile ``num_replicas="auto"`` selects (Ray's): 1 to 100 replicas, target 2."""
        return cls(min_replicas=1, max_replicas=100, target_ongoing_requests=2.0)

    @classmethod
    def from_value(cls, value: AutoscalingConfig | Mapping[str, Any]) -> AutoscalingConfig:
        """Accept an ``AutoscalingConfig`` or a dict of its fields; unknown keys are an error."""
        if isinstance(value, AutoscalingConfig):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"autoscaling_config must be a dict or AutoscalingConfig, got "
                f"{type(value).__name__}."
            )
        data = dict(value)
        for legacy in _LEGACY_TARGET_NAMES:  # Ray's deprecated spellings
            if legacy in data:
                data.setdefault("target_ongoing_requests", data.pop(legacy))
        cls.check_keys(data)
        return cls(**data)

    @classmethod
    def check_keys(cls, value: Mapping[str, Any]) -> None:
        """Reject keys that are not fields, naming the valid ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        reject_unknown("autoscaling_config", value, fields | set(_LEGACY_TARGET_NAMES))

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (a config file's ``autoscaling_config``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["aggregation_function"] = self.aggregation_function.value
        data["policy"] = self.policy.to_dict()
        return data

    def get_upscaling_factor(self) -> float:
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests

    def replica_bounds(self) -> tuple[int, int, int | None]:
        """(min_replicas, max_replicas, initial_replicas)."""
        return self.min_replicas, self.max_replicas, self.initial_replicas

    def start_replicas(self) -> int:
        """How many replicas a fresh deployment starts with."""
        if self.initial_replicas is not None:
            return self.initial_replicas
        return self.min_replicas


def _check_int(obj: object, name: str, *, minimum: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"autoscaling_config: {name} must be an integer, got {type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"autoscaling_config: {name} must be >= {minimum}, got {value}.")


def _check_float(obj: object, name: str, *, positive: bool) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"autoscaling_config: {name} must be a number, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"autoscaling_config: {name} must be > 0, got {value}.")
    if not positive and value < 0:
        raise ValueError(f"autoscaling_config: {name} must be >= 0, got {value}.")


class ProxyLocation(enum.StrEnum):
    """Where serve runs its HTTP and gRPC proxies (Ray's names; ``EveryNode`` is the default)."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"

    @classmethod
    def from_value(cls, value: ProxyLocation | str | None) -> ProxyLocation:
        if value is None:
            return cls.EveryNode
        if isinstance(value, ProxyLocation):
            return value
        for member in cls:
            if str(value).lower() == member.value.lower():
                return member
        raise ValueError(
            f"Unknown proxy_location {value!r}: use one of {', '.join(repr(m.value) for m in cls)}."
        )


@dataclasses.dataclass(frozen=True)
class HTTPOptions:
    """The HTTP proxy's options (Ray's ``http_options``): where it listens, how long a request
    may take before it is answered 408 (``None``: no limit), and, with ``ssl_keyfile`` and
    ``ssl_certfile`` (PEM files), HTTPS instead of HTTP; ``ssl_ca_certs`` names the CA file
    for client certificates, ``ssl_keyfile_password`` the key's password.

    ``direct_ingress`` has ingress replicas serve HTTP (and gRPC) themselves, each on a port of
    its own; ``ha_proxy`` puts HAProxy on this port (and the gRPC port) in front of them, and
    implies ``direct_ingress``. They are the config-file and ``serve.start`` spelling of
    ``SERVE_ENABLE_DIRECT_INGRESS`` / ``SERVE_ENABLE_HA_PROXY`` (Ray's
    ``RAY_SERVE_ENABLE_DIRECT_INGRESS`` / ``RAY_SERVE_ENABLE_HA_PROXY``)."""

    host: str = "127.0.0.1"
    port: int = dataclasses.field(
        default_factory=lambda: _port_env("SERVE_DEFAULT_HTTP_PORT", 8000)
    )
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float = 90.0
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = dataclasses.field(default=None, repr=False)
    ssl_ca_certs: str | None = None
    direct_ingress: bool = False
    ha_proxy: bool = False

    def __post_init__(self) -> None:
        _check_port(self.port, "http_options")
        for name in ("direct_ingress", "ha_proxy"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"http_options.{name} must be true or false, got {getattr(self, name)!r}."
                )
        _check_timeout(self.request_timeout_s, "http_options.request_timeout_s")
        _check_timeout(self.keep_alive_timeout_s, "http_options.keep_alive_timeout_s")
        if self.root_path and not self.root_path.startswith("/"):
            raise ValueError(f"http_options.root_path must start with '/', got {self.root_path!r}")
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_ca_certs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"http_options.{name} must be a path (str), got {value!r}.")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ValueError(
                "Both ssl_keyfile and ssl_certfile must be provided together to enable HTTPS "
                f"(got ssl_keyfile={self.ssl_keyfile!r}, ssl_certfile={self.ssl_certfile!r})."
            )

    @property
    def https(self) -> bool:
        """Whether the proxy serves HTTPS."""
        return bool(self.ssl_keyfile and self.ssl_certfile)

    @classmethod
    def from_value(cls, value: HTTPOptions | Mapping[str, Any] | None) -> HTTPOptions:
        options: HTTPOptions = _options_from(cls, value, "http_options", _IGNORED_HTTP_KEYS)
        return options


@dataclasses.dataclass(frozen=True)
class gRPCOptions:
    """The gRPC proxy's options (Ray's ``grpc_options``). The gRPC proxy runs only when
    ``grpc_servicer_functions`` names at least one ``add_XServicer_to_server`` import path."""

    port: int = dataclasses.field(
        default_factory=lambda: _port_env("SERVE_DEFAULT_GRPC_PORT", 9000)
    )
    grpc_servicer_functions: tuple[str, ...] = ()
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        _check_port(self.port, "grpc_options")
        _check_timeout(self.request_timeout_s, "grpc_options.request_timeout_s")
        functions: Any = self.grpc_servicer_functions
        if isinstance(functions, str) or not all(isinstance(f, str) for f in functions):
            raise TypeError(
                "grpc_options.grpc_servicer_functions must be a list of import paths such as "
                f"'my_pb2_grpc.add_MyServicer_to_server', got {functions!r}."
            )
        object.__setattr__(self, "grpc_servicer_functions", tuple(functions))

    @classmethod
    def from_value(cls, value: gRPCOptions | Mapping[str, Any] | None) -> gRPCOptions:
        options: gRPCOptions = _options_from(cls, value, "grpc_options", frozenset())
        return options


# Ray fields that only make sense on a Ray cluster: accepted, and without effect here.
_IGNORED_HTTP_KEYS = frozenset({"location", "num_cpus", "root_url", "middlewares"})


def _options_from(cls: Any, value: Any, what: str, ignored: frozenset[str]) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict or {cls.__name__}, got {type(value).__name__}.")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names - ignored)
    if unknown:
        raise ValueError(f"Unknown {what} field(s) {unknown}; known: {sorted(names)}.")
    return cls(**{k: v for k, v in value.items() if k in names})


def _port_env(name: str, default: int) -> int:
    """A default port from the environment (as Ray's RAY_SERVE_DEFAULT_HTTP_PORT)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a port number.") from exc


def _check_port(port: object, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{what}.port must be an integer between 0 and 65535, got {port!r}.")


def _check_timeout(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0 (or None), got {value!r}.")
