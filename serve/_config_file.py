"""Ray Serve's config file (ServeDeploySchema's fields), parsed with positions for errors.

Example::

    applications:
      - name: app1
        route_prefix: /
        import_path: examples.apps:app
        args: {}
        deployments:
          - name: Model
            num_replicas: 2
            user_config: {threshold: 0.5}

An application's ``autoscaling_policy: {policy_function: module:name}`` decides for all of its
autoscaled deployments together (imported where the file is read, as Ray does). Unknown keys
and bad values are rejected with ``file:line:column``. Ray's cluster-level fields
``proxy_location``, ``http_options`` and ``grpc_options`` configure the proxy of a controller
that ``serve run`` starts (a running controller keeps its own, with a warning), and so do
``logging_config``, ``controller_options`` and ``tracing_config``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from serve._deployment import Application
from serve._options import DEPLOYMENT_OPTION_NAMES, validate_deployment_options
from serve._proxy_flags import controller_flags
from serve.config import AutoscalingPolicy

TOP_LEVEL_KEYS = frozenset(
    {"applications", "proxy_location", "http_options", "grpc_options", "logging_config",
     "target_capacity", "controller_options", "tracing_config"}
)  # fmt: skip
APPLICATION_KEYS = frozenset(
    {"name", "route_prefix", "import_path", "args", "runtime_env", "deployments",
     "logging_config", "external_scaler_enabled", "autoscaling_policy"}
)  # fmt: skip
DEPLOYMENT_KEYS = frozenset(DEPLOYMENT_OPTION_NAMES - {"version"}) | {"name"}


class ConfigFileError(ValueError):
    """A config file that cannot be deployed; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class DeploymentOverride:
    name: str
    options: dict[str, Any]
    where: str


@dataclasses.dataclass(frozen=True)
class AppConfig:
    name: str
    route_prefix: str | None
    import_path: str
    args: dict[str, Any]
    deployments: list[DeploymentOverride]
    logging_config: dict[str, Any] | None
    where: str
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # as written in the file
    # an application-level policy: decides for all its autoscaled deployments together
    autoscaling_policy: AutoscalingPolicy | None = None


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path

    def where(self, node: yaml.Node) -> str:
        mark = node.start_mark
        return f"{self.path}:{mark.line + 1}:{mark.column + 1}"

    def fail(self, node: yaml.Node, message: str) -> ConfigFileError:
        return ConfigFileError(f"{self.where(node)}: {message}")

    def mapping(self, node: yaml.Node, what: str, allowed: frozenset[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping.")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in allowed:
                raise self.fail(
                    key_node, f"unknown key {key!r} in {what}; valid keys are {sorted(allowed)}."
                )
            if key in out:
                raise self.fail(key_node, f"duplicate key {key!r} in {what}.")
            out[key] = value_node
        return out

    def value(self, node: yaml.Node) -> Any:
        return yaml.safe_load(yaml.serialize(node))

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.value(node)
        if not isinstance(value, str) or not value:
            raise self.fail(node, f"{what} must be a non-empty string, got {value!r}.")
        return value


def load_config(path: str | Path) -> list[AppConfig]:
    """Parse and validate a config file (no imports happen here)."""
    text = Path(path).read_text()
    reader = _Reader(str(path))
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: not valid YAML: {exc}") from exc
    if root is None:
        raise ConfigFileError(f"{path}: the file is empty; it needs `applications:`.")
    top = reader.mapping(root, "the config", TOP_LEVEL_KEYS)
    if "applications" not in top:
        raise reader.fail(root, "missing `applications:` (a list of applications).")
    apps_node = top["applications"]
    if not isinstance(apps_node, yaml.SequenceNode):
        raise reader.fail(apps_node, "`applications` must be a list.")
    apps: list[AppConfig] = []
    seen: set[str] = set()
    for app_node in apps_node.value:
        fields = reader.mapping(app_node, "an application", APPLICATION_KEYS)
        if "import_path" not in fields:
            raise reader.fail(app_node, "an application needs `import_path` (module:attribute).")
        name = reader.string(fields["name"], "name") if "name" in fields else "default"
        if name in seen:
            raise reader.fail(fields.get("name", app_node), f"application {name!r} appears twice.")
        seen.add(name)
        route_prefix = reader.value(fields["route_prefix"]) if "route_prefix" in fields else "/"
        if route_prefix is not None and not isinstance(route_prefix, str):
            raise reader.fail(fields["route_prefix"], "route_prefix must be a string or null.")
        args = reader.value(fields["args"]) if "args" in fields else {}
        if not isinstance(args, dict):
            raise reader.fail(fields["args"], "args must be a mapping.")
        logging_config = None
        if "logging_config" in fields:
            logging_config = _validated(
                reader,
                fields["logging_config"],
                {"logging_config": reader.value(fields["logging_config"])},
            )["logging_config"]
        policy = None
        if "autoscaling_policy" in fields:
            node = fields["autoscaling_policy"]
            try:
                policy = AutoscalingPolicy.from_value(reader.value(node), "autoscaling_policy")
            except (TypeError, ValueError, ImportError, AttributeError) as exc:
                raise reader.fail(node, str(exc)) from exc
        overrides: list[DeploymentOverride] = []
        if "deployments" in fields:
            deployments_node = fields["deployments"]
            if not isinstance(deployments_node, yaml.SequenceNode):
                raise reader.fail(deployments_node, "`deployments` must be a list.")
            for dep_node in deployments_node.value:
                dep_fields = reader.mapping(dep_node, "a deployment", DEPLOYMENT_KEYS)
                if "name" not in dep_fields:
                    raise reader.fail(dep_node, "a deployment override needs `name`.")
                dep_name = reader.string(dep_fields["name"], "name")
                options: dict[str, Any] = {}
                for key, value_node in dep_fields.items():
                    if key == "name":
                        continue
                    options.update(_validated(reader, value_node, {key: reader.value(value_node)}))
                overrides.append(DeploymentOverride(dep_name, options, reader.where(dep_node)))
        apps.append(
            AppConfig(
                name=name,
                route_prefix=route_prefix,
                import_path=reader.string(fields["import_path"], "import_path"),
                args=args,
                deployments=overrides,
                logging_config=logging_config,
                where=reader.where(app_node),
                source=reader.value(app_node),
                autoscaling_policy=policy,
            )
        )
    return apps


def load_top_level(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping, as plain data."""
    try:
        top = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    if not isinstance(top, dict):
        raise ConfigFileError(f"{path}: the config must be a mapping.")
    return top


def load_proxy_options(path: str | Path) -> list[str] | None:
    """serve-controller flags for the file's ``proxy_location``, ``http_options`` and
    ``grpc_options`` (None when it sets none of them)."""
    try:
        top = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc
    if not isinstance(top, dict) or not {"proxy_location", "http_options", "grpc_options"} & set(
        top
    ):
        return None
    try:
        return controller_flags(
            top.get("proxy_location"), top.get("http_options"), top.get("grpc_options")
        )
    except (TypeError, ValueError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc


def _validated(reader: _Reader, node: yaml.Node, option: dict[str, Any]) -> dict[str, Any]:
    try:
        return validate_deployment_options(option)
    except (TypeError, ValueError) as exc:
        raise reader.fail(node, str(exc).replace("serve.deployment: ", "")) from exc


def import_application(import_path: str, args: dict[str, Any] | None = None) -> Application:
    """``module:attribute`` (or ``module.attribute``): an Application, or a builder function
    taking the config's ``args`` and returning one."""
    if ":" in import_path:
        module_name, _, attribute = import_path.partition(":")
    else:
        module_name, _, attribute = import_path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigFileError(
            f"import_path {import_path!r} must look like 'module:attribute' (e.g. 'app:app')."
        )
    if "" not in sys.path:
        sys.path.insert(0, "")  # import from the working directory, like `python -m`
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigFileError(f"Cannot import {module_name!r} for {import_path!r}: {exc}") from exc
    target = getattr(module, attribute, None)
    if target is None:
        raise ConfigFileError(f"Module {module_name!r} has no attribute {attribute!r}.")
    if isinstance(target, Application):
        if args:
            raise ConfigFileError(
                f"{import_path!r} is an application, not a builder function: it takes no args."
            )
        return target
    if callable(target):
        built = _call_builder(import_path, target, args or {})
        if not isinstance(built, Application):
            raise ConfigFileError(
                f"The builder {import_path!r} returned {type(built).__name__}, not an "
                "Application (Deployment.bind(...))."
            )
        return built
    raise ConfigFileError(
        f"{import_path!r} is a {type(target).__name__}; it must be an Application or a builder."
    )


def _call_builder(import_path: str, builder: Any, args: dict[str, Any]) -> Any:
    """Call an application builder as Ray does: with the config's ``args`` as a dict, or, when
    its one parameter is annotated with a pydantic model, as that model (validated)."""
    try:
        parameters = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    if len(parameters) != 1:
        raise ConfigFileError(
            f"The application builder {import_path!r} must take exactly one parameter (the "
            f"args dict, or a pydantic model of them); it takes {len(parameters)}."
        )
    try:
        annotation = typing.get_type_hints(builder).get(parameters[0].name)
    except Exception:
        annotation = parameters[0].annotation
    validate = getattr(annotation, "model_validate", None) or getattr(annotation, "parse_obj", None)
    given: Any = args
    if inspect.isclass(annotation) and validate is not None:
        try:
            given = validate(args)
        except Exception as exc:  # pydantic's ValidationError
            raise ConfigFileError(
                f"The args for {import_path!r} do not fit {annotation.__name__}: {exc}"
            ) from exc
    try:
        return builder(given)
    except Exception as exc:
        raise ConfigFileError(
            f"The application builder {import_path!r} raised {type(exc).__name__}: {exc}"
        ) from exc
