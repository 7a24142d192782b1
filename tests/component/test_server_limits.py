"""Which requests count as control calls, and the server options derived from settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from serve._proto import controller_pb2, replica_pb2
from serve._rpc.channel import server_options
from serve._rpc.service import _carries_payload
from serve._settings import settings


@pytest.fixture
def fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    settings.cache_clear()


def test_only_requests_with_names_and_numbers_get_the_control_limit() -> None:
    payload = set()
    for file, service in ((controller_pb2, "Controller"), (replica_pb2, "Replica")):
        for method in file.DESCRIPTOR.services_by_name[service].methods:
            if _carries_payload(method.input_type):
                payload.add(method.name)
    # Code, init args, user config or data frames: bounded by SERVE_MAX_MESSAGE_BYTES only.
    assert payload == {"Deploy", "Link", "Connect", "Initialize", "Reconfigure"}


def test_server_options_follow_settings_and_the_open_file_limit(
    fresh_settings: pytest.MonkeyPatch,
) -> None:
    options = dict(server_options(open_file_limit=1024))
    assert options["grpc.max_receive_message_length"] == 500 * 2**20
    assert options["grpc.server_handshake_timeout_ms"] == 10_000
    assert options["grpc.max_connection_idle_ms"] == 120_000
    assert options["grpc.max_allowed_incoming_connections"] == 512

    fresh_settings.setenv("SERVE_MAX_MESSAGE_BYTES", "1000")
    fresh_settings.setenv("SERVE_HANDSHAKE_TIMEOUT_S", "2.5")
    fresh_settings.setenv("SERVE_IDLE_CONNECTION_TIMEOUT_S", "inf")
    fresh_settings.setenv("SERVE_MAX_CONNECTIONS", "77")
    settings.cache_clear()
    options = dict(server_options(open_file_limit=1024))
    assert options["grpc.max_receive_message_length"] == 1000
    assert options["grpc.server_handshake_timeout_ms"] == 2500
    assert options["grpc.max_connection_idle_ms"] == 2**31 - 1
    assert options["grpc.max_allowed_incoming_connections"] == 77


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SERVE_MAX_MESSAGE_BYTES", "0"),
        ("SERVE_MAX_MESSAGE_BYTES", str(2**31)),
        ("SERVE_MAX_CONTROL_MESSAGE_BYTES", "4MB"),
        ("SERVE_HANDSHAKE_TIMEOUT_S", "-1"),
        ("SERVE_MAX_CONNECTIONS", "-5"),
    ],
)
def test_a_bad_limit_is_a_clear_error(
    fresh_settings: pytest.MonkeyPatch, name: str, value: str
) -> None:
    fresh_settings.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        settings()
