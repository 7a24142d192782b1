"""Bad input on every RPC and port: an error status for the caller, the daemons keep serving."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import grpc
import grpc.aio
import pytest

import serve
from serve import _client
from serve._settings import REPLICA_ID_METADATA_KEY, TOKEN_METADATA_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_instance")]

CONTROLLER_UNARY = [
    "Deploy",
    "DeleteApplication",
    "GetStatus",
    "WaitApplication",
    "GetApplication",
    "Shutdown",
    "ReportModels",
    "ReportLoad",
]
CONTROLLER_STREAM = ["WatchDeployment", "Link"]
REPLICA_UNARY = ["Initialize", "Reconfigure", "CheckHealth", "QueueLength", "Stop"]
# Field 1 with wire type 7 does not exist: no protobuf parser accepts this.
GARBAGE = b"\x0f" + os.urandom(64)


@serve.deployment
class Ping:
    def __call__(self) -> str:
        return "pong"


REPLICA_ID = ""  # the replica the Connect calls below are meant for (set by _targets)


def _targets() -> tuple[str, str, str]:
    global REPLICA_ID
    handle = serve.run(Ping.bind(), name="hostile")
    assert handle.remote().result() == "pong"
    client = _client.current()
    assert client is not None
    assert client.token
    replica = client.routing_state(handle.deployment_id).routable[0]
    REPLICA_ID = replica.replica_id
    return client.address, replica.address, client.token


async def _call(
    address: str,
    method: str,
    kind: str,
    payload: bytes | None,
    token: str | None,
    replica_id: str | None = None,
) -> tuple[grpc.StatusCode, str]:
    """Send one raw message (none on a bidi call if ``payload`` is None); return the final
    status and details. Connect calls name the replica they are for (``replica_id``)."""
    metadata: tuple[tuple[str, str], ...] = ((TOKEN_METADATA_KEY, token),) if token else ()
    if kind == "bidi":
        wanted = REPLICA_ID if replica_id is None else replica_id
        metadata += ((REPLICA_ID_METADATA_KEY, wanted),)
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any
        if kind == "unary":
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes | None, bytes] = channel.unary_unary(
                method
            )
            call = unary(payload, metadata=metadata, timeout=10)
        elif kind == "server_stream":
            streaming: grpc.aio.UnaryStreamMultiCallable[bytes | None, bytes] = (
                channel.unary_stream(method)
            )
            call = streaming(payload, metadata=metadata, timeout=10)
        else:
            call = channel.stream_stream(method)(metadata=metadata, timeout=10)
            if payload is not None:
                await call.write(payload)
                await call.done_writing()
        return await call.code(), await call.details() or ""


def _calls() -> list[tuple[str, str, str]]:
    calls = [("controller", f"/serve.v1.Controller/{m}", "unary") for m in CONTROLLER_UNARY]
    calls += [
        ("controller", f"/serve.v1.Controller/{m}", "server_stream") for m in CONTROLLER_STREAM
    ]
    calls += [("replica", f"/serve.v1.Replica/{m}", "unary") for m in REPLICA_UNARY]
    calls += [("replica", "/serve.v1.Replica/Connect", "bidi")]
    return calls


def test_calls_without_the_token_are_refused_before_decoding() -> None:
    controller, replica, _ = _targets()

    async def main() -> None:
        for target, method, kind in _calls():
            address = controller if target == "controller" else replica
            for token in (None, "wrong-token"):
                # A refusal happens before any message is read; on a bidi call a write would
                # race it, so none is sent.
                payload = None if kind == "bidi" else GARBAGE
                code, details = await _call(address, method, kind, payload, token)
                assert code == grpc.StatusCode.UNAUTHENTICATED, method
                assert "cluster token" in details

    asyncio.run(main())
    assert serve.get_app_handle("hostile").remote().result() == "pong"


def test_garbage_messages_get_an_error_status_and_the_daemons_keep_serving() -> None:
    controller, replica, token = _targets()

    async def main() -> None:
        for target, method, kind in _calls():
            address = controller if target == "controller" else replica
            code, details = await _call(address, method, kind, GARBAGE, token)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
            assert "Malformed" in details, method

    asyncio.run(main())
    handle = serve.get_app_handle("hostile")
    assert [handle.remote().result() for _ in range(5)] == ["pong"] * 5
    assert serve.status().applications["hostile"].status == "RUNNING"


def test_a_data_stream_meant_for_another_replica_is_refused() -> None:
    _, replica, token = _targets()

    async def main() -> None:
        for wanted in ("", "other#Ping#00000000"):
            code, details = await _call(
                replica, "/serve.v1.Replica/Connect", "bidi", None, token, replica_id=wanted
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (wanted, code, details)
            assert f"not {wanted!r}" in details

    asyncio.run(main())
    assert serve.get_app_handle("hostile").remote().result() == "pong"


def test_raw_bytes_on_the_ports_do_not_disturb_the_daemons() -> None:
    controller, replica, _ = _targets()
    for address in (controller, replica):
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(4096))
            sock.settimeout(5)
            try:
                while sock.recv(4096):
                    pass
            except (TimeoutError, ConnectionResetError):
                pass
    assert serve.get_app_handle("hostile").remote().result() == "pong"
