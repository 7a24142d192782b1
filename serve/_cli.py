"""The ``serve`` command: run, deploy, status, delete, shutdown, build, start.

Every command talks to the controller at ``--address``, else ``SERVE_ADDRESS``, else the
standalone controller recorded in the state directory; ``serve run`` alone starts an embedded one
when there is none (and stops it on Ctrl-C).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, NoReturn

from serve._proxy_flags import (
    add_proxy_options,
    options_from_args,
    proxy_flags,
    secret_env,
)
from serve.config import ProxyLocation
from serve.exceptions import ControllerUnavailableError, ServeError


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"serve: {message}", file=sys.stderr)
    sys.exit(code)


def _connect(
    address: str | None,
    *,
    start_embedded: bool = False,
    controller_args: list[str] | None = None,
    controller_env: dict[str, str] | None = None,
) -> Any:
    from serve import _api, _client

    try:
        if start_embedded:
            return _api._connect(
                address, controller_args=controller_args, controller_env=controller_env
            )
        return _client.connect(address, start_embedded=False, controller_args=controller_args)
    except ControllerUnavailableError as exc:
        _fail(
            f"{exc}\nStart one with `serve start`, or point to one elsewhere with --address "
            "(or SERVE_ADDRESS)."
        )


def _app_specs(import_path: str, name: str, args: dict[str, Any], overrides: Any = None) -> Any:
    from serve._api import build_specs
    from serve._config_file import ConfigFileError, import_application

    try:
        app = import_application(import_path, args)
        return build_specs(app, name, overrides=overrides)
    except (ConfigFileError, ValueError, TypeError) as exc:
        _fail(str(exc))


def _load_config(path: str) -> Any:
    from serve._config_file import ConfigFileError, load_config

    try:
        return load_config(path)
    except (ConfigFileError, OSError) as exc:
        _fail(str(exc))


def _progress(name: str) -> Any:
    last: list[str] = []

    def show(status: Any, elapsed_s: float) -> None:
        parts = [
            f"{dep}: {sum(d.replica_states.get(s, 0) for s in ('RUNNING',))} running"
            + (f", {d.message}" if d.message else "")
            for dep, d in sorted(status.deployments.items())
        ]
        line = f"[{elapsed_s:4.1f}s] {name}: {status.status} ({'; '.join(parts)})"
        if not last or last[0] != line:
            print(line, flush=True)
            last[:] = [line]

    return show


def _deploy_and_wait(
    client: Any, name: str, route_prefix: Any, ingress: str, specs: Any, policy: Any = None
) -> None:
    from serve._api import _deploy, code_env
    from serve._sync import run_sync

    try:
        run_sync(
            _deploy(
                client,
                name,
                route_prefix,
                ingress,
                specs,
                code_env(),
                progress=_progress(name),
                autoscaling_policy=policy,
            )
        )
    except ServeError as exc:
        _fail(str(exc))


def _builder_args(pairs: list[str]) -> dict[str, str]:
    """``key=value`` words from the command line, for an application builder (as Ray's)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"Builder arguments look like key=value; got {pair!r}.")
        parsed[key] = value
    return parsed


def cmd_run(args: argparse.Namespace) -> None:
    from serve import _api
    from serve._sync import run_sync

    flags = env = None
    if args.target.endswith((".yaml", ".yml")):
        flags = _proxy_options(args.target)
        env = _controller_env(args.target)
    client = _connect(args.address, start_embedded=True, controller_args=flags, controller_env=env)
    deployed: list[str] = []
    served: list[tuple[str, str | None]] = []
    if not args.non_blocking:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C at any point (while deploying too) stops what this command started.
    try:
        if args.target.endswith((".yaml", ".yml")):
            for app in _load_config(args.target):
                overrides = {d.name: d.options for d in app.deployments}
                ingress, specs = _app_specs(app.import_path, app.name, app.args, overrides)
                deployed.append(app.name)
                served.append((app.name, app.route_prefix))
                _deploy_and_wait(
                    client, app.name, app.route_prefix, ingress, specs, app.autoscaling_policy
                )
        else:
            ingress, specs = _app_specs(args.target, args.name, _builder_args(args.arguments))
            deployed.append(args.name)
            served.append((args.name, args.route_prefix))
            _deploy_and_wait(client, args.name, args.route_prefix, ingress, specs)
        for name, route_prefix in served:
            if route_prefix is not None:
                for url in run_sync(_api.served_urls(client, route_prefix)):
                    print(f"Application {name!r} is ready at {url}.", flush=True)
        print(f"Running {', '.join(map(repr, deployed))}. Press Ctrl-C to stop.", flush=True)
        if args.non_blocking:
            return
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        if client.owner is not None:
            _api.shutdown()
        else:
            for name in deployed:
                run_sync(client.controller.delete_application(name, wait=True))
        print("Stopped.", flush=True)


def cmd_deploy(args: argparse.Namespace) -> None:
    from serve._api import code_env
    from serve._sync import run_sync

    apps = _load_config(args.config)
    prepared = []
    for app in apps:
        overrides = {d.name: d.options for d in app.deployments}
        ingress, specs = _app_specs(app.import_path, app.name, app.args, overrides)
        prepared.append((app, ingress, specs))
    client = _connect(args.address, controller_args=_proxy_options(args.config))
    env = code_env()
    wanted = {app.name for app in apps}
    status = run_sync(client.controller.status())
    for name in sorted(set(status.applications) - wanted):  # declarative: unlisted apps go
        run_sync(client.controller.delete_application(name, wait=False))
        print(f"Deleting application {name!r} (not in {args.config}).")
    for app, ingress, specs in prepared:
        try:
            run_sync(
                client.controller.deploy(
                    app_name=app.name,
                    route_prefix=app.route_prefix,
                    ingress=ingress,
                    specs=specs,
                    code_env=env,
                    config_json=json.dumps(app.source),
                    autoscaling_policy=app.autoscaling_policy,
                )
            )
        except (ServeError, ValueError) as exc:
            _fail(f"{app.where}: {exc}")
    print(f"Sent deploy request for {sorted(wanted)}.", flush=True)
    if args.wait:
        from serve._api import _wait_settled

        for app in apps:
            try:
                run_sync(_wait_settled(client, app.name, progress=_progress(app.name)))
            except ServeError as exc:
                _fail(str(exc))


def _status_dict(status: Any) -> dict[str, Any]:
    return {
        name: {
            "status": str(app.status),
            "message": app.message,
            "route_prefix": app.route_prefix,
            "last_deployed_time_s": app.last_deployed_time_s,
            "deployments": {
                dep_name: {
                    "status": str(dep.status),
                    "status_trigger": str(dep.status_trigger),
                    "message": dep.message,
                    "replica_states": {str(k): v for k, v in dep.replica_states.items()},
                    "autoscaling_policy": dep.autoscaling_policy,
                    "scaling_decisions": [dataclasses.asdict(s) for s in dep.scaling_decisions],
                }
                for dep_name, dep in app.deployments.items()
            },
        }
        for name, app in status.applications.items()
    }


def cmd_status(args: argparse.Namespace) -> None:
    from serve._sync import run_sync

    client = _connect(args.address)
    full = run_sync(client.controller.status())
    status = _status_dict(full)
    proxies = {node: dataclasses.asdict(p) for node, p in full.proxy_details.items()}
    if args.json:
        out = {"proxies": proxies, "applications": status, "dashboard_url": full.dashboard_url}
        print(json.dumps(out, indent=2))
        return
    if full.dashboard_url:
        print(f"Dashboard: {full.dashboard_url}")
    for node, proxy in sorted(proxies.items()):
        where = ", ".join(
            f"{'https' if kind == 'http' and proxy['https'] else kind} {proxy[f'{kind}_address']}"
            for kind in ("http", "grpc")
            if proxy[f"{kind}_address"]
        )
        line = f"proxy {node}: {proxy['status']}" + (f" ({where})" if where else "")
        print(line + (f": {proxy['message']}" if proxy["message"] else ""))
    if not status:
        print("No applications.")
        return
    rows = [("APPLICATION", "STATUS", "DEPLOYMENT", "DEPLOYMENT STATUS", "REPLICAS", "MESSAGE")]
    for name, app in sorted(status.items()):
        first = True
        for dep_name, dep in sorted(app["deployments"].items()):
            replicas = ", ".join(f"{k}: {v}" for k, v in sorted(dep["replica_states"].items()))
            rows.append(
                (
                    name if first else "",
                    app["status"] if first else "",
                    dep_name,
                    dep["status"],
                    replicas or "-",
                    dep["message"],
                )
            )
            first = False
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[5]
        )
    for name, app in sorted(status.items()):
        for dep_name, dep in sorted(app["deployments"].items()):
            print(_autoscaling_line(f"{name}.{dep_name}", dep), end="")


def _autoscaling_line(where: str, dep: dict[str, Any]) -> str:
    """``serve status``'s line on an autoscaled deployment: its policy and last decision."""
    policy, decisions = dep["autoscaling_policy"], dep["scaling_decisions"]
    if not policy and not decisions:
        return ""
    line = f"{where}: autoscaling policy {policy or 'default'}"
    if decisions:
        last = decisions[0]
        when = time.strftime("%H:%M:%S", time.localtime(last["timestamp_s"]))
        line += (
            f"; last decision {last['prev_num_replicas']} -> {last['curr_num_replicas']} "
            f"replicas at {when}: {last['reason']}"
        )
    return line + "\n"


def cmd_config(args: argparse.Namespace) -> None:
    """Print the config each application was deployed with (Ray's `serve config`)."""
    import yaml

    from serve._sync import run_sync

    client = _connect(args.address)
    names = [args.name] if args.name else sorted(run_sync(client.controller.status()).applications)
    documents = []
    for name in names:
        text = run_sync(client.controller.deployed_config(name))
        if text is None:
            _fail(f"There is no application {name!r}.")
        if text:
            documents.append(yaml.safe_dump(json.loads(text), sort_keys=False))
        else:
            documents.append(f"# {name!r} was deployed with serve.run, not from a config file.\n")
    print("---\n".join(documents), end="")


def cmd_delete(args: argparse.Namespace) -> None:
    from serve._sync import run_sync

    client = _connect(args.address)
    if run_sync(client.controller.delete_application(args.name, wait=True)):
        print(f"Deleted application {args.name!r}.")
    else:
        _fail(f"There is no application {args.name!r}.")


def cmd_shutdown(args: argparse.Namespace) -> None:
    from serve._sync import run_sync

    client = _connect(args.address)
    run_sync(client.controller.shutdown(), timeout_s=300)
    print("Serve is shut down: every application deleted and the controller stopped.")


def cmd_build(args: argparse.Namespace) -> None:
    import yaml

    from serve._config_file import ConfigFileError, import_application
    from serve._deployment import build_application
    from serve.handle import DeploymentHandle

    applications = []
    for i, import_path in enumerate(args.targets):
        name = "default" if len(args.targets) == 1 else f"app{i + 1}"
        try:
            app = import_application(import_path)
        except ConfigFileError as exc:
            _fail(str(exc))
        _, built = build_application(app, name, make_handle=DeploymentHandle)
        deployments = []
        for b in built:
            options = {
                k: v
                for k, v in b.deployment._options.items()
                if k not in ("name", "version", "route_prefix") and v is not None
            }
            for key, value in list(options.items()):
                if hasattr(value, "to_dict"):
                    options[key] = value.to_dict()
            deployments.append({"name": b.name, **options})
        applications.append(
            {
                "name": name,
                "route_prefix": "/",
                "import_path": import_path,
                "args": {},
                "deployments": deployments,
            }
        )
    text = yaml.safe_dump({"applications": applications}, sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"Wrote {args.output}.")
    else:
        print(text, end="")


def _proxy_options(path: str) -> list[str] | None:
    """Controller flags for a config file's proxy_location, http_options and grpc_options."""
    from serve._config_file import ConfigFileError, load_proxy_options

    try:
        return load_proxy_options(path)
    except ConfigFileError as exc:
        _fail(str(exc))


def _controller_env(path: str) -> dict[str, str] | None:
    """An embedded controller's environment for a config file's logging_config,
    controller_options and tracing_config."""
    from serve._api import controller_env
    from serve._config_file import ConfigFileError, load_top_level

    try:
        top = load_top_level(path)
        env = (
            controller_env(
                top.get("logging_config"), top.get("controller_options"), top.get("tracing_config")
            )
            or {}
        )
        env.update(secret_env(top.get("http_options")))
        return env or None
    except (ConfigFileError, TypeError, ValueError, ImportError, AttributeError) as exc:
        _fail(f"{path}: {exc}")


def _port_free(host: str, address: str) -> bool:
    """Whether the port of ``address`` can be bound on ``host`` now."""
    import socket

    try:
        port = int(address.rsplit(":", 1)[1])
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except (OSError, ValueError, IndexError):
        return False
    return True


def cmd_start(args: argparse.Namespace) -> None:
    from serve._client import read_ready_line
    from serve._settings import settings
    from serve._state_dir import ensure_private_dir, last_address, recorded_controller

    state_dir = settings().state_dir
    running = recorded_controller(state_dir)
    if running is not None:
        print(f"A serve controller already runs at {running} (state directory {state_dir}).")
        return
    ensure_private_dir(state_dir)
    port = args.port
    last = last_address(state_dir)
    if port is None:
        # After a crash, the same port: the replicas still running re-link to the new controller.
        port = int(last.rsplit(":", 1)[1]) if last and _port_free(args.host, last) else 0
    command = [
        sys.executable, "-P", "-m", "controller", "--state-dir", str(state_dir),
        "--host", args.host, "--port", str(port),
    ]  # fmt: skip
    if not args.no_dashboard:
        command += ["--metrics-port", str(args.metrics_port)]
    try:
        http, grpc = options_from_args(args)
        location = ProxyLocation.from_value(args.proxy_location) if args.proxy_location else None
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    command += proxy_flags(http, grpc, args.proxy_workers)
    if location is not None:
        command += ["--proxy-location", location.value]
    env = dict(os.environ)
    env.pop("SERVE_LOG_LEVEL", None)
    if _user_log_level is not None:
        env["SERVE_LOG_LEVEL"] = _user_log_level
    log = open(state_dir / "controller.out", "ab")  # noqa: SIM115 - handed to the daemon
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
        start_new_session=True, env=env,
    )  # fmt: skip
    try:
        ready = read_ready_line(process, 60)
    except ControllerUnavailableError as exc:
        _fail(str(exc))
    finally:
        log.close()
    print(f"serve controller running at {ready['address']} (pid {ready['pid']}).")
    if location is not ProxyLocation.Disabled:
        print(f"HTTP proxy on {http.host}:{http.port} (see `serve status`).")
    if "dashboard" in ready:
        print(f"Dashboard at {ready['dashboard']} (Prometheus metrics at /metrics).")
    print(f"State and logs in {state_dir}; stop it with `serve shutdown`.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="serve", description="Deploy and operate serve applications."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--address", default=None, help="controller host:port")
        return sub

    run = add("run", "Deploy an application (module:attribute) or a config file, then block.")
    run.add_argument("target", help="module:app, a builder module:function, or config.yaml")
    run.add_argument(
        "arguments", nargs="*", metavar="KEY=VALUE", help="args for an application builder"
    )
    run.add_argument("--name", default="default", help="application name (default 'default')")
    run.add_argument("--route-prefix", default="/", help="route prefix (recorded)")
    run.add_argument("--non-blocking", action="store_true", help="return once it runs")
    run.set_defaults(func=cmd_run)

    deploy = add("deploy", "Make the applications of a config file the deployed ones.")
    deploy.add_argument("config", help="a config file (Ray Serve's schema)")
    deploy.add_argument("--wait", action="store_true", help="wait until every app runs")
    deploy.set_defaults(func=cmd_deploy)

    config = add("config", "Print the config the applications were deployed with.")
    config.add_argument("-n", "--name", default=None, help="only this application")
    config.set_defaults(func=cmd_config)

    status = add("status", "Show applications, deployments and replica states.")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    delete = add("delete", "Delete one application.")
    delete.add_argument("name", help="the application's name")
    delete.set_defaults(func=cmd_delete)

    shutdown = add("shutdown", "Delete every application and stop the controller.")
    shutdown.set_defaults(func=cmd_shutdown)

    build = commands.add_parser("build", help="Write a config file for applications in code.")
    build.add_argument("targets", nargs="+", help="module:app")
    build.add_argument("-o", "--output", default=None, help="file to write (default stdout)")
    build.set_defaults(func=cmd_build)

    start = commands.add_parser("start", help="Start a standalone controller in the background.")
    start.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    start.add_argument(
        "--port",
        type=int,
        default=None,
        help="port to bind (default: the last controller's, so its replicas re-link; else free)",
    )
    start.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="port of the dashboard and Prometheus metrics, on loopback (default: a free one)",
    )
    start.add_argument(
        "--no-dashboard", action="store_true", help="serve no dashboard nor metrics port"
    )
    start.add_argument(
        "--proxy-location",
        default=None,
        help="EveryNode (default), HeadOnly or Disabled: where the HTTP/gRPC proxy runs",
    )
    add_proxy_options(start)
    start.set_defaults(func=cmd_start)
    return parser


# The user's own SERVE_LOG_LEVEL: the CLI quiets the daemons it runs in the foreground
# (`serve run`), but a background controller (`serve start`) logs to its files at the level
# the user chose (INFO by default).
_user_log_level: str | None = None


def main(argv: list[str] | None = None) -> None:
    global _user_log_level
    args = build_parser().parse_args(argv)
    _user_log_level = os.environ.get("SERVE_LOG_LEVEL")
    os.environ.setdefault("SERVE_LOG_LEVEL", "WARNING")
    if "" not in sys.path:
        sys.path.insert(0, "")
    args.func(args)
