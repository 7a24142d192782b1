"""``serve-replica``: started by a controller's launcher, one per replica."""

from __future__ import annotations

import argparse
import sys

from serve._models import ReplicaID
from serve._settings import settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="serve-replica",
        description="Host one replica of a serve deployment (started by serve-controller).",
    )
    parser.add_argument("--controller", required=True, help="the controller's host:port")
    parser.add_argument("--replica-id", required=True, help="app#deployment#tag")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind and advertise (default loopback); 'auto': this node's address "
        "on the route to the controller (what a cluster launcher passes)",
    )
    parser.add_argument("--port", type=int, default=0, help="port to bind (default ephemeral)")
    parser.add_argument("--log-file", default=None, help="also write logs to this file")
    parser.add_argument(
        "--gang",
        default=None,
        help="its gang, as JSON (serve.gang.GangContext's fields): set by the launcher",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        replica_id = ReplicaID.parse(args.replica_id)
    except ValueError:
        parser.error(f"--replica-id must look like app#deployment#tag, got {args.replica_id!r}")

    from pathlib import Path

    import uvloop

    from replica.server import ReplicaServer
    from serve import _tracing
    from serve._daemon import route_address
    from serve._logging import configure
    from serve._rpc.channel import tls_from_settings

    host = route_address(args.controller) if args.host == "auto" else args.host
    if args.gang:
        import json

        from serve._context import set_gang_context
        from serve.gang import GangContext

        try:
            set_gang_context(GangContext.from_dict(json.loads(args.gang)))
        except (ValueError, KeyError, TypeError) as exc:
            parser.error(f"--gang must be a GangContext as JSON: {exc}")
    log_file = Path(args.log_file) if args.log_file else None
    configure(f"replica:{replica_id}", log_file)
    _tracing.setup(log_file.stem if log_file else f"replica_{replica_id.unique_id}", log_file)
    s = settings()
    server = ReplicaServer(
        replica_id,
        controller_address=args.controller,
        host=host,
        port=args.port,
        token=s.token,
        tls=tls_from_settings(),
        orphan_timeout_s=s.orphan_timeout_s,
        log_file=log_file,
    )
    sys.exit(uvloop.run(server.run()))
