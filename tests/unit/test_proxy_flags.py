"""The proxy options' command-line flags: what a driver's ``http_options`` become for its
controller, its proxies and its replicas, and back."""

from __future__ import annotations

import argparse

import pytest

from serve._proxy_flags import add_proxy_options, controller_flags, options_from_args, proxy_flags
from serve.config import HTTPOptions, gRPCOptions


def _parsed(flags: list[str]) -> tuple[HTTPOptions, gRPCOptions]:
    parser = argparse.ArgumentParser()
    add_proxy_options(parser)
    return options_from_args(parser.parse_args(flags))


@pytest.mark.parametrize(
    "http",
    [
        HTTPOptions(port=0),
        HTTPOptions(port=0, direct_ingress=True),
        HTTPOptions(port=0, direct_ingress=True, ha_proxy=True),
        HTTPOptions(port=0, ha_proxy=True),
    ],
)
def test_the_ingress_mode_survives_the_flags(http: HTTPOptions) -> None:
    grpc = gRPCOptions(port=0, grpc_servicer_functions=("a.b",))
    assert _parsed(proxy_flags(http, grpc)) == (http, grpc)


def test_the_config_files_fields_become_the_controllers_flags() -> None:
    flags = controller_flags(None, {"port": 0, "direct_ingress": True, "ha_proxy": True}, None)
    assert "--direct-ingress" in flags
    assert "--ha-proxy" in flags
    assert "--direct-ingress" not in controller_flags(None, {"port": 0}, None)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"direct_ingress": "yes"}, "http_options.direct_ingress must be true or false, got 'yes'"),
        ({"ha_proxy": 1}, "http_options.ha_proxy must be true or false, got 1."),
    ],
)
def test_a_mode_that_is_not_a_bool_is_refused(value: dict[str, object], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        HTTPOptions.from_value(value)
