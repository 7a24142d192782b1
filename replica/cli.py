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
    from serve._logging import configure
    from serve._rpc.channel import tls_from_settings

    host = route_address(args.controller) if args.host == "auto" else args.host
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


def route_address(controller_address: str) -> str:
    """This node's address on the route to the controller: what peers on other nodes reach.

    A UDP "connect" sends nothing; it only asks the kernel which local address it would use.
    """
    import socket

    host = controller_address.rsplit(":", 1)[0].strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        address: str = probe.getsockname()[0]
    return address
