"""The proxy's command-line options, shared by serve-proxy, serve-controller and `serve start`,
and the flags that hand ``HTTPOptions`` / ``gRPCOptions`` from a driver to its controller."""

from __future__ import annotations

import argparse
import json
import os

from serve._settings import INGRESS_FLAGS_ENV
from serve.config import HTTPOptions, ProxyLocation, gRPCOptions

# The key's password never goes on a command line (any user can read those): it travels in
# the environment, from the driver to its controller and from the controller to the proxy.
SSL_KEYFILE_PASSWORD_ENV = "SERVE_HTTP_SSL_KEYFILE_PASSWORD"


def add_proxy_options(parser: argparse.ArgumentParser) -> None:
    """The options of the proxy, shared by serve-proxy, serve-controller and `serve start`."""
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="HTTP interface (default loopback)"
    )
    http, grpc = HTTPOptions(), gRPCOptions()
    parser.add_argument(
        "--http-port",
        type=int,
        default=http.port,
        help="HTTP port (default 8000, or SERVE_DEFAULT_HTTP_PORT)",
    )
    parser.add_argument(
        "--http-request-timeout-s",
        type=float,
        default=None,
        help="answer 408 after this long; the deadline travels with nested calls",
    )
    parser.add_argument(
        "--http-keep-alive-timeout-s",
        type=float,
        default=90.0,
        help="close an idle keep-alive connection after this long (default 90)",
    )
    parser.add_argument(
        "--http-ssl-keyfile", default=None, help="serve HTTPS with this PEM key (and certfile)"
    )
    parser.add_argument("--http-ssl-certfile", default=None, help="PEM certificate for HTTPS")
    parser.add_argument(
        "--http-ssl-ca-certs", default=None, help="CA file for client certificates (HTTPS)"
    )
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=grpc.port,
        help="gRPC port (default 9000, or SERVE_DEFAULT_GRPC_PORT)",
    )
    parser.add_argument(
        "--grpc-servicer-functions",
        default="",
        help="comma-separated import paths of add_XServicer_to_server functions; the gRPC "
        "proxy runs only when some are given",
    )
    parser.add_argument(
        "--grpc-request-timeout-s",
        type=float,
        default=None,
        help="DEADLINE_EXCEEDED after this long; the deadline travels with nested calls",
    )
    parser.add_argument(
        "--proxy-workers",
        type=int,
        default=1,
        help="HTTP worker processes sharing the port (default 1)",
    )
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="ingress replicas serve HTTP themselves, each on a port of its own "
        "(SERVE_ENABLE_DIRECT_INGRESS=1)",
    )
    parser.add_argument(
        "--ha-proxy",
        action="store_true",
        help="HAProxy on the proxy's port, balancing onto ingress replicas that serve HTTP "
        "themselves (SERVE_ENABLE_HA_PROXY=1; implies --direct-ingress)",
    )


def options_from_args(args: argparse.Namespace) -> tuple[HTTPOptions, gRPCOptions]:
    http = HTTPOptions(
        host=args.http_host,
        port=args.http_port,
        request_timeout_s=args.http_request_timeout_s,
        keep_alive_timeout_s=args.http_keep_alive_timeout_s,
        ssl_keyfile=args.http_ssl_keyfile,
        ssl_certfile=args.http_ssl_certfile,
        ssl_ca_certs=args.http_ssl_ca_certs,
        ssl_keyfile_password=os.environ.get(SSL_KEYFILE_PASSWORD_ENV) or None,
        direct_ingress=args.direct_ingress,
        ha_proxy=args.ha_proxy,
    )
    functions = tuple(f.strip() for f in args.grpc_servicer_functions.split(",") if f.strip())
    grpc = gRPCOptions(
        port=args.grpc_port,
        grpc_servicer_functions=functions,
        request_timeout_s=args.grpc_request_timeout_s,
    )
    if args.proxy_workers < 1:
        raise ValueError(f"--proxy-workers must be >= 1, got {args.proxy_workers}")
    return http, grpc


def inherited_ingress_options() -> tuple[HTTPOptions, gRPCOptions]:
    """The controller's proxy options, for an ingress replica serving HTTP itself: the
    controller puts them in the environment its replicas inherit (``_SERVE_INGRESS_FLAGS``)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_proxy_options(parser)
    flags = json.loads(os.environ.get(INGRESS_FLAGS_ENV) or "[]")
    return options_from_args(parser.parse_args(flags))


def proxy_flags(http: HTTPOptions, grpc: gRPCOptions, workers: int = 1) -> list[str]:
    """The command-line flags that give a proxy these options (inverse of options_from_args)."""
    flags = [
        "--http-host",
        http.host,
        "--http-port",
        str(http.port),
        "--http-keep-alive-timeout-s",
        str(http.keep_alive_timeout_s),
        "--grpc-port",
        str(grpc.port),
        "--proxy-workers",
        str(workers),
    ]
    if http.request_timeout_s is not None:
        flags += ["--http-request-timeout-s", str(http.request_timeout_s)]
    if grpc.request_timeout_s is not None:
        flags += ["--grpc-request-timeout-s", str(grpc.request_timeout_s)]
    if grpc.grpc_servicer_functions:
        flags += ["--grpc-servicer-functions", ",".join(grpc.grpc_servicer_functions)]
    for flag, on in (("--direct-ingress", http.direct_ingress), ("--ha-proxy", http.ha_proxy)):
        if on:
            flags.append(flag)
    for flag, value in (
        ("--http-ssl-keyfile", http.ssl_keyfile),
        ("--http-ssl-certfile", http.ssl_certfile),
        ("--http-ssl-ca-certs", http.ssl_ca_certs),
    ):
        if value:
            flags += [flag, os.path.abspath(value)]
    return flags


def secret_env(http_options: HTTPOptions | dict[str, object] | None) -> dict[str, str]:
    """What the options say that must not be on a command line, as environment variables."""
    password = HTTPOptions.from_value(http_options).ssl_keyfile_password
    return {SSL_KEYFILE_PASSWORD_ENV: password} if password else {}


def controller_flags(
    proxy_location: ProxyLocation | str | None,
    http_options: HTTPOptions | dict[str, object] | None,
    grpc_options: gRPCOptions | dict[str, object] | None,
) -> list[str]:
    """serve-controller flags for Ray's ``serve.start`` options (validated here)."""
    flags = proxy_flags(HTTPOptions.from_value(http_options), gRPCOptions.from_value(grpc_options))
    if proxy_location is not None:
        flags += ["--proxy-location", ProxyLocation.from_value(proxy_location).value]
    return flags
