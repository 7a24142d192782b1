"""``serve-controller``: the daemon that owns goal state and replicas."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from serve._proxy_flags import add_proxy_options, options_from_args, proxy_flags
from serve._settings import DIRECT_INGRESS_ENV, HA_PROXY_ENV, INGRESS_FLAGS_ENV, settings
from serve.config import ProxyLocation


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``serve-controller`` (the docs' CLI reference is generated from it)."""
    parser = argparse.ArgumentParser(
        prog="serve-controller",
        description=(
            'Run a serve controller. Prints one JSON line {"event": "ready", ...} on stdout '
            "when it serves."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default ephemeral)")
    parser.add_argument(
        "--advertise-host",
        default=None,
        help="the address replicas and drivers on other hosts use to reach this controller "
        "(default --host, or 127.0.0.1 when --host is a wildcard)",
    )
    parser.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="where replicas run: processes on this host (default), or one Slurm job each",
    )
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="local launcher: CPUs replicas may hold together (ray_actor_options num_cpus, "
        "default 1 each); replicas beyond it stay pending (default: no cap)",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="local launcher: GPUs to hand out as CUDA_VISIBLE_DEVICES by num_gpus "
        "(default: GPUs are not managed)",
    )
    parser.add_argument(
        "--replica-host",
        default="127.0.0.1",
        help="local launcher: the interface replicas bind and advertise",
    )
    parser.add_argument("--slurm-partition", default=None, help="Slurm launcher: the partition")
    parser.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="Slurm launcher: an sbatch option for every replica job, e.g. "
        "--slurm-option=--time=7-0 --slurm-option=--account=ml (repeatable)",
    )
    parser.add_argument(
        "--slurm-poll-s",
        type=float,
        default=0.5,
        help="Slurm launcher: how often squeue is asked about replica jobs",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="goal state, token and logs (default SERVE_STATE_DIR or ~/.serve)",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="where the controller and its replicas write logs (default STATE_DIR/logs)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="interface for the metrics port; beyond loopback, scrapes must send the cluster "
        "token as a bearer token",
    )
    parser.add_argument(
        "--metrics-no-auth",
        action="store_true",
        help="serve metrics beyond loopback without the bearer token (anyone who can reach the "
        "port sees application names and load)",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="owned by a driver: stop everything when stdin closes; remove the state dir on exit",
    )
    parser.add_argument(
        "--proxy-location",
        default=None,
        help="EveryNode (default; SERVE_PROXY_LOCATION changes it), HeadOnly or Disabled: "
        "where serve-proxy runs",
    )
    add_proxy_options(parser)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a YAML file of these options by name (launcher: slurm, slurm_partition: serve, "
        "slurm_option: [...], num_gpus: 2, http_port: 8000, ...); flags given too win",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    config_path = _config_path(argv)
    if config_path is not None:
        _apply_config_file(parser, config_path)
    args = parser.parse_args(argv)
    try:
        location = ProxyLocation.from_value(args.proxy_location or settings().proxy_location)
        http, grpc = options_from_args(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be between 0 and 65535, got {args.metrics_port}")
    if args.num_cpus is not None and args.num_cpus <= 0:
        parser.error(f"--num-cpus must be > 0, got {args.num_cpus}")
    if args.num_gpus is not None and args.num_gpus < 0:
        parser.error(f"--num-gpus must be >= 0, got {args.num_gpus}")
    if args.slurm_poll_s <= 0:
        parser.error(f"--slurm-poll-s must be > 0, got {args.slurm_poll_s}")
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else settings().state_dir
    # The ingress mode and the proxy options reach the proxies and replicas through the
    # environment they inherit from this process.
    if args.direct_ingress:
        os.environ[DIRECT_INGRESS_ENV] = "1"
    if args.ha_proxy:
        os.environ[HA_PROXY_ENV] = "1"
    os.environ[INGRESS_FLAGS_ENV] = json.dumps(proxy_flags(http, grpc))
    exporter = settings().tracing_exporter_import_path
    if exporter:  # proxies and replicas trace with it: a wrong one fails here, not in each
        from serve._tracing import check_exporter

        try:
            check_exporter(exporter)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            parser.error(f"SERVE_TRACING_EXPORTER_IMPORT_PATH={exporter!r}: {exc}")

    import uvloop

    from controller.launchers import LauncherConfig
    from controller.server import ControllerServer
    from controller.slurm_cli import SlurmOptions
    from serve._logging import configure
    from serve._state_dir import ensure_private_dir

    log_dir = Path(args.log_dir).expanduser() if args.log_dir else state_dir / "logs"
    # Private before anything lands in them (log setup would create them world-readable).
    ensure_private_dir(state_dir)
    ensure_private_dir(log_dir)
    configure("controller", log_dir / "controller.log")
    server = ControllerServer(
        host=args.host,
        port=args.port,
        state_dir=state_dir,
        embedded=args.embedded,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        metrics_no_auth=args.metrics_no_auth,
        log_dir=log_dir,
        proxy_location=location,
        proxy_flags=proxy_flags(http, grpc, args.proxy_workers),
        advertise_host=args.advertise_host,
        launcher=LauncherConfig(
            kind=args.launcher,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            replica_host=args.replica_host,
            slurm=SlurmOptions(
                partition=args.slurm_partition,
                sbatch_options=tuple(args.slurm_option),
                poll_s=args.slurm_poll_s,
            ),
        ),
    )
    sys.exit(uvloop.run(server.run()))


NOT_IN_CONFIG = frozenset({"config", "embedded", "help"})


def _config_path(argv: list[str] | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.config  # type: ignore[no-any-return]


def _apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Take option defaults from a YAML file: the same options as the flags, by name."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {exc}")
    if loaded is None:
        return
    if not isinstance(loaded, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_CONFIG}
    defaults: dict[str, object] = {}
    for key, value in loaded.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            parser.error(
                f"--config {path}: unknown option {key!r}; known: {', '.join(sorted(actions))}"
            )
        try:
            defaults[dest] = _config_value(action, value)
        except (TypeError, ValueError) as exc:
            parser.error(f"--config {path}: {key}: {exc}")
    parser.set_defaults(**defaults)


def _config_value(action: argparse.Action, value: object) -> object:
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [str(item) for item in items]
    if value is None:
        return None
    converted = action.type(value) if callable(action.type) else str(value)  # type: ignore[arg-type]
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted
