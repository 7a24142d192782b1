"""``serve-proxy``: started by the controller, one per node; HTTP and gRPC ingress."""

from __future__ import annotations

import argparse
import os
import sys

from serve._proxy_flags import add_proxy_options, options_from_args
from serve._settings import settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="serve-proxy",
        description="HTTP and gRPC ingress for serve applications (started by serve-controller).",
    )
    parser.add_argument("--controller", required=True, help="the controller's host:port")
    parser.add_argument("--node-id", default=None, help="this node's id (default: hostname)")
    parser.add_argument("--log-file", default=None, help="also write logs to this file")
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    add_proxy_options(parser)
    args = parser.parse_args(argv)
    if args.http_host == "auto":  # a proxy on a cluster node: the node's own address
        from serve._daemon import route_address

        args.http_host = route_address(args.controller)
    try:
        http, grpc = options_from_args(args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))

    from pathlib import Path

    import uvloop

    from serve import _tracing
    from serve._logging import configure
    from serve._proxy.server import ProxyServer
    from serve._rpc.channel import tls_from_settings

    log_file = Path(args.log_file) if args.log_file else None
    configure("proxy", log_file)
    _tracing.setup(f"proxy_{os.getpid()}", log_file)  # workers share the log, not span files
    s = settings()
    server = ProxyServer(
        controller_address=args.controller,
        token=s.token,
        tls=tls_from_settings(),
        node_id=args.node_id or settings().node_id,
        http=http,
        grpc=grpc,
        workers=args.proxy_workers,
        worker_fd=args.worker_fd,
        orphan_timeout_s=s.orphan_timeout_s,
        log_file=args.log_file,
    )
    sys.exit(uvloop.run(server.run()))
