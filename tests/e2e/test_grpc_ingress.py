"""gRPC ingress through real daemons: the proxy forwards user-defined gRPC methods (it has no
copy of the protos) to the ingress deployment's methods; a grpc client with generated stubs.
Every test runs in the three ingress modes (tests/support/ingress.py): through the proxy, at
an ingress replica's own gRPC port (direct ingress), and through HAProxy in front of those."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serve
import serve.context
import serve.exceptions
from serve.generated import serve_pb2, serve_pb2_grpc
from serve.grpc_util import RayServegRPCContext, gRPCInputStream
from serve.handle import DeploymentHandle
from tests.support import greeter_pb2, greeter_pb2_grpc
from tests.support.ingress import Ingress, haproxy_sent_to, haproxy_serves, replica_addresses
from tests.support.procs import proxy_details, wait_for

pytestmark = pytest.mark.e2e


@serve.deployment
class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        model = serve.get_multiplexed_model_id() or "-"
        context = serve.context._get_serve_request_context()
        assert context is not None
        if request.name == "whoami":
            return greeter_pb2.HelloReply(message=context.request_id)
        return greeter_pb2.HelloReply(message=f"{self.greeting} {request.name} [{model}]")

    async def CountTo(
        self, request: greeter_pb2.HelloRequest
    ) -> AsyncIterator[greeter_pb2.HelloReply]:
        for i in range(request.count):
            yield greeter_pb2.HelloReply(message=f"{request.name} {i}")
            await asyncio.sleep(0)


@serve.deployment
class SlowGreeter:
    async def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        await asyncio.sleep(30)
        return greeter_pb2.HelloReply(message="late")


@serve.deployment
class Inner:
    async def work(self, marker: str) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Path(marker).write_text("cancelled")  # noqa: ASYNC240 - a test marker
            raise
        return "late"


@serve.deployment
class Relay:
    def __init__(self, inner: DeploymentHandle[Any]) -> None:
        self.inner = inner

    async def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        try:
            return greeter_pb2.HelloReply(message=await self.inner.work.remote(request.name))
        except serve.exceptions.RequestTimeoutError as exc:
            Path(f"{request.name}.relay").write_text(type(exc).__name__)  # noqa: ASYNC240
            raise


class Channels:
    """gRPC channels to where a test's calls for an application go, in its ingress mode
    (``channels("greet")``), closed after the test."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self._open: list[grpc.Channel] = []

    def __call__(self, app: str | None = None) -> grpc.Channel:
        channel = grpc.insecure_channel(self.ingress.grpc_address(app))
        self._open.append(channel)
        return channel

    def close(self) -> None:
        for channel in self._open:
            channel.close()


@pytest.fixture
def channels(ingress: Ingress) -> Iterator[Channels]:
    opened = Channels(ingress)
    yield opened
    opened.close()


def test_unary_and_server_streaming_methods(channels: Channels) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    stub = greeter_pb2_grpc.GreeterStub(channels("greet"))
    app = (("application", "greet"),)
    reply = stub.SayHello(greeter_pb2.HelloRequest(name="Ada"), metadata=app, timeout=10)
    assert reply.message == "Hello Ada [-]"
    items = stub.CountTo(greeter_pb2.HelloRequest(name="n", count=3), metadata=app, timeout=10)
    assert [r.message for r in items] == ["n 0", "n 1", "n 2"]
    # The caller's request id reaches the replica, as in Ray.
    whoami = greeter_pb2.HelloRequest(name="whoami")
    assert stub.SayHello(whoami, metadata=(("request_id", "rid-7"),), timeout=10).message == (
        "rid-7"
    )
    # One application: the metadata may be left out.
    assert stub.SayHello(greeter_pb2.HelloRequest(name="B"), timeout=10).message == "Hello B [-]"


def test_application_metadata_picks_the_app_and_model_id_is_honoured(
    channels: Channels,
) -> None:
    serve.run(Greeter.bind("Hello"), name="en", route_prefix="/en")
    serve.run(Greeter.bind("Bonjour"), name="fr", route_prefix="/fr")
    # Direct: each application's calls go to one of its own replicas.
    stub = greeter_pb2_grpc.GreeterStub(channels("fr"))
    request = greeter_pb2.HelloRequest(name="Ada")
    fr = stub.SayHello(
        request, metadata=(("application", "fr"), ("multiplexed_model_id", "m7")), timeout=10
    )
    assert fr.message == "Bonjour Ada [m7]"
    en = greeter_pb2_grpc.GreeterStub(channels("en"))
    assert en.SayHello(request, metadata=(("application", "en"),), timeout=10).message == (
        "Hello Ada [-]"
    )
    with pytest.raises(grpc.RpcError) as unknown:
        stub.SayHello(request, metadata=(("application", "de"),), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'de'" in str(unknown.value.details())
    with pytest.raises(grpc.RpcError) as ambiguous:
        stub.SayHello(request, timeout=10)  # two applications and no metadata
    assert ambiguous.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_deadline_is_deadline_exceeded(channels: Channels) -> None:
    serve.run(SlowGreeter.bind(), name="slow", route_prefix="/slow")
    stub = greeter_pb2_grpc.GreeterStub(channels("slow"))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10


def test_the_client_deadline_travels_to_nested_calls(channels: Channels, tmp_path: Path) -> None:
    serve.run(Relay.bind(Inner.bind()), name="relay", route_prefix="/relay")
    marker = tmp_path / "inner"
    stub = greeter_pb2_grpc.GreeterStub(channels("relay"))
    with pytest.raises(grpc.RpcError) as late:
        stub.SayHello(greeter_pb2.HelloRequest(name=str(marker)), timeout=1.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(marker.exists, timeout_s=10)  # the inner replica's work was cancelled
    assert marker.read_text() == "cancelled"
    relay = Path(f"{marker}.relay")
    wait_for(relay.exists, timeout_s=10)  # the nested call failed with the deadline's error
    assert relay.read_text() == "RequestTimeoutError"


def test_standard_health_service(channels: Channels) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    stub = health_pb2_grpc.HealthStub(channels("greet"))
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", ["/greeter.Greeter/NoSuchMethod", "/no.such.Service/SayHello"])
def test_unknown_method_is_unimplemented(channels: Channels, method: str) -> None:
    """As a gRPC server answers an unknown service or method: UNIMPLEMENTED, naming it."""
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    channel = channels("greet")
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    with pytest.raises(grpc.RpcError) as error:
        call(b"", timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert method in str(error.value.details())


def test_undecodable_message_is_invalid_argument(channels: Channels) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    channel = channels("greet")
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/greeter.Greeter/SayHello"
    )
    with pytest.raises(grpc.RpcError) as error:
        call(b"\xff\xff\xff\xff garbage", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decode" in str(error.value.details())
    # The replica is unharmed.
    stub = greeter_pb2_grpc.GreeterStub(channel)
    reply = stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=10)
    assert reply.message == "Hello x [-]"


@serve.deployment
class Contextual:
    """Ray's gRPC context, client streaming and bidirectional streaming."""

    def SayHello(
        self, request: greeter_pb2.HelloRequest, grpc_context: RayServegRPCContext
    ) -> greeter_pb2.HelloReply:
        metadata = dict(grpc_context.invocation_metadata())
        if request.name == "teapot":  # a status without raising
            grpc_context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            grpc_context.set_details("short and stout")
            return greeter_pb2.HelloReply(message="unseen")
        if request.name == "raise":  # the code set before raising is the call's status
            grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            raise ValueError("not for you")
        grpc_context.set_trailing_metadata(
            [
                ("x-seen", metadata.get("x-user", "?")),
                ("x-app", grpc_context.application() or "?"),
                ("x-rid", grpc_context.request_id() or "?"),
            ]
        )
        return greeter_pb2.HelloReply(
            message=f"hello {metadata.get('x-user')} at {grpc_context.peer()}"
        )

    async def JoinNames(
        self, requests: gRPCInputStream[greeter_pb2.HelloRequest]
    ) -> greeter_pb2.HelloReply:
        names = [request.name async for request in requests]
        return greeter_pb2.HelloReply(message=",".join(names))

    async def Echo(
        self, requests: gRPCInputStream[greeter_pb2.HelloRequest]
    ) -> AsyncIterator[greeter_pb2.HelloReply]:
        async for request in requests:
            yield greeter_pb2.HelloReply(message=request.name.upper())


def test_grpc_context_reads_metadata_and_sets_status_and_trailers(channels: Channels) -> None:
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    stub = greeter_pb2_grpc.GreeterStub(channels("ctx"))
    metadata = (("application", "ctx"), ("x-user", "ada"), ("request_id", "rid-9"))
    reply, call = stub.SayHello.with_call(
        greeter_pb2.HelloRequest(name="x"), metadata=metadata, timeout=10
    )
    assert reply.message.startswith("hello ada at ipv")
    trailers = dict(call.trailing_metadata())
    assert trailers["x-seen"] == "ada"
    assert (trailers["x-app"], trailers["x-rid"]) == ("ctx", "rid-9")
    assert trailers["request_id"] == "rid-9"  # as Ray, the request id comes back
    with pytest.raises(grpc.RpcError) as teapot:
        stub.SayHello(greeter_pb2.HelloRequest(name="teapot"), metadata=metadata, timeout=10)
    assert teapot.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert teapot.value.details() == "short and stout"
    with pytest.raises(grpc.RpcError) as denied:
        stub.SayHello(greeter_pb2.HelloRequest(name="raise"), metadata=metadata, timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not for you" in str(denied.value.details())


def test_client_streaming_and_bidirectional_streaming(channels: Channels) -> None:
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    stub = greeter_pb2_grpc.GreeterStub(channels("ctx"))
    metadata = (("application", "ctx"),)
    names = [f"n{i}" for i in range(300)]  # more than the ingress window holds at once
    joined = stub.JoinNames(
        (greeter_pb2.HelloRequest(name=n) for n in names), metadata=metadata, timeout=30
    )
    assert joined.message == ",".join(names)
    empty = stub.JoinNames(iter(()), metadata=metadata, timeout=30)
    assert empty.message == ""
    echoed = stub.Echo(
        (greeter_pb2.HelloRequest(name=n) for n in ("a", "b", "c")), metadata=metadata, timeout=30
    )
    assert [r.message for r in echoed] == ["A", "B", "C"]


def test_bidirectional_streaming_answers_each_message_as_it_comes(ingress: Ingress) -> None:
    """A reply arrives before the client sends its next message: the call really streams."""
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    address = ingress.grpc_address("ctx")

    async def talk() -> list[str]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            call = stub.Echo(metadata=(("application", "ctx"),), timeout=30)
            heard = []
            for name in ("x", "y", "z"):
                await call.write(greeter_pb2.HelloRequest(name=name))
                heard.append(cast(greeter_pb2.HelloReply, await call.read()).message)
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            return heard

    assert asyncio.run(talk()) == ["X", "Y", "Z"]


def test_ray_serve_api_service(channels: Channels) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    stub = serve_pb2_grpc.RayServeAPIServiceStub(channels("greet"))
    listed = stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=10)
    assert "greet" in listed.application_names
    assert stub.Healthz(serve_pb2.HealthzRequest(), timeout=10).message == "success"


def test_not_found_says_where_to_look(channels: Channels) -> None:
    serve.run(Greeter.bind("Hello"), name="en", route_prefix="/en")
    serve.run(Greeter.bind("Bonjour"), name="fr", route_prefix="/fr")
    stub = greeter_pb2_grpc.GreeterStub(channels("en"))
    request = greeter_pb2.HelloRequest(name="Ada")
    with pytest.raises(grpc.RpcError) as unknown:
        stub.SayHello(request, metadata=(("application", "de"),), timeout=10)
    assert unknown.value.details() == (
        "Application 'de' not found. Ping /ray.serve.RayServeAPIService/ListApplications for "
        "available applications."
    )
    with pytest.raises(grpc.RpcError) as unset:
        stub.SayHello(request, timeout=10)
    assert unset.value.code() == grpc.StatusCode.NOT_FOUND
    assert str(unset.value.details()).startswith("Application metadata not set.")


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Busy:
    """Holds each call until the file its request names exists."""

    async def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        Path(f"{request.name}.started").touch()  # noqa: ASYNC240 - a test marker
        async with asyncio.timeout(30):
            while not Path(request.name).exists():  # noqa: ASYNC240, ASYNC110 - a test marker
                await asyncio.sleep(0.02)
        return greeter_pb2.HelloReply(message="done")


def test_backpressure_is_resource_exhausted(ingress: Ingress, tmp_path: Path) -> None:
    """One call runs (max_ongoing_requests=1), one may wait (max_queued_requests=1): of five
    more, the others are refused at once with RESOURCE_EXHAUSTED, naming the limit."""
    serve.run(Busy.bind(), name="busy", route_prefix="/busy")
    marker = tmp_path / "release"
    address = ingress.grpc_address("busy")

    async def main() -> list[grpc.aio.AioRpcError]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            request = greeter_pb2.HelloRequest(name=str(marker))
            running = asyncio.ensure_future(stub.SayHello(request, timeout=30))
            started = Path(f"{marker}.started")
            await asyncio.to_thread(wait_for, started.exists, 10.0)
            more = [asyncio.ensure_future(stub.SayHello(request, timeout=30)) for _ in range(5)]
            refused: list[grpc.aio.AioRpcError] = []
            pending: set[asyncio.Future[Any]] = set(more)
            while pending and not refused:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                refused += [e for f in done if isinstance(e := f.exception(), grpc.aio.AioRpcError)]
            marker.touch()  # the held calls finish
            replies = await asyncio.gather(running, *more, return_exceptions=True)
            assert cast(greeter_pb2.HelloReply, replies[0]).message == "done"
            return refused

    refused = asyncio.run(main())
    assert refused, "no call was refused"
    assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "max_queued_requests" in str(refused[0].details())


def test_direct_calls_reach_the_replicas_own_grpc_port(direct: Ingress) -> None:
    """Direct ingress: the ingress replica listens for gRPC itself, on a port of its own that
    the controller publishes, and answers there; the serve-proxy is not in the path."""
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    address = direct.grpc_address("ctx")
    port = address.rsplit(":", 1)[1]
    assert address != proxy_details().grpc_address
    owners = {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == int(port)}
    assert owners, f"nothing listens on {address}"
    for pid in owners:
        command = psutil.Process(pid).cmdline()
        assert command[command.index("-m") + 1] == "replica", command
        assert pid != proxy_details().pid
    with grpc.insecure_channel(address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        metadata = (("x-user", "ada"), ("request_id", "rid-direct"))
        reply, call = stub.SayHello.with_call(
            greeter_pb2.HelloRequest(name="x"), metadata=metadata, timeout=10
        )
        assert reply.message.startswith("hello ada at ipv")
        assert dict(call.trailing_metadata())["request_id"] == "rid-direct"
        # Another application's calls are not this replica's: NOT_FOUND, saying where to go.
        with pytest.raises(grpc.RpcError) as other:
            stub.SayHello(
                greeter_pb2.HelloRequest(name="x"), metadata=(("application", "nope"),), timeout=10
            )
        assert other.value.code() == grpc.StatusCode.NOT_FOUND


def test_haproxy_balances_calls_onto_the_replicas_grpc_ports(haproxy: Ingress) -> None:
    """Behind HAProxy, calls (with the application metadata, or without it when there is one
    application) go to the replicas' own gRPC ports, spread over them, not to the proxy."""
    serve.run(Greeter.options(num_replicas=2).bind("Hello"), name="greet", route_prefix="/greet")
    address = haproxy.grpc_address("greet")
    wait_for(lambda: len(replica_addresses("greet", grpc=True)) == 2, timeout_s=30)
    replicas = replica_addresses("greet", grpc=True)
    wait_for(lambda: haproxy_serves("greet", grpc=True), timeout_s=30)
    before = haproxy_sent_to(replicas)
    with grpc.insecure_channel(address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        for metadata in ((("application", "greet"),), ()):
            for _ in range(20):
                reply = stub.SayHello(
                    greeter_pb2.HelloRequest(name="x"), metadata=metadata, timeout=10
                )
                assert reply.message == "Hello x [-]"
    after = haproxy_sent_to(replicas)
    sent = {a: after[a] - before[a] for a in replicas}
    assert sum(sent.values()) == 40, sent
    assert all(sent.values()), f"one replica got no call: {sent}"


@serve.deployment
class Abandoned:
    async def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        Path(f"{request.name}.started").touch()  # noqa: ASYNC240 - a test marker
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Path(request.name).write_text("cancelled")  # noqa: ASYNC240 - a test marker
            raise
        return greeter_pb2.HelloReply(message="late")


def test_a_client_that_cancels_cancels_the_call_in_the_replica(
    ingress: Ingress, tmp_path: Path
) -> None:
    serve.run(Abandoned.bind(), name="gone", route_prefix="/gone")
    marker = tmp_path / "gone"
    with grpc.insecure_channel(ingress.grpc_address("gone")) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)
        future = stub.SayHello.future(greeter_pb2.HelloRequest(name=str(marker)), timeout=60)
        wait_for(Path(f"{marker}.started").exists, timeout_s=10)
        future.cancel()
        wait_for(marker.exists, timeout_s=10)
    assert marker.read_text() == "cancelled"


@serve.deployment
class Pid:
    def __init__(self, label: str = "v1") -> None:
        self.label = label

    async def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        await asyncio.sleep(0.005)
        return greeter_pb2.HelloReply(message=f"{self.label} {os.getpid()}")


CALLERS = 8


async def _grpc_load(
    address: str,
    seconds: float,
    on_reply: Callable[[list[str]], None] = lambda served: None,
    longer: Callable[[], bool] = lambda: False,
) -> tuple[list[str], list[grpc.StatusCode]]:
    """``CALLERS`` callers of SayHello in a closed loop for ``seconds``, or while ``longer()``
    holds (at most 60 s): the replies ("version pid") and the codes of the calls that failed."""
    served: list[str] = []
    failed: list[grpc.StatusCode] = []
    start = time.monotonic()
    stop = start + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = greeter_pb2_grpc.GreeterStub(channel)

        async def caller() -> None:
            while (now := time.monotonic()) < stop or (longer() and now < start + 60):
                try:
                    reply = await stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failed.append(exc.code())
                else:
                    served.append(reply.message)
                    on_reply(served)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return served, failed


def _pids(served: list[str]) -> set[int]:
    return {int(reply.split()[1]) for reply in served}


def _grpc_served(haproxy: Ingress, app: str) -> str:
    address = haproxy.grpc_address(app)
    wait_for(lambda: len(replica_addresses(app, grpc=True)) == 2, timeout_s=30)
    wait_for(lambda: haproxy_serves(app, grpc=True), timeout_s=30)
    return address


def test_a_killed_replica_fails_only_the_grpc_calls_it_held(haproxy: Ingress) -> None:
    """Behind HAProxy, under load from 8 concurrent callers, one of two replicas is SIGKILLed:
    only calls it held fail (at most one per caller), and the calls go on to the
    other replica, then to the replacement."""
    serve.run(Pid.options(num_replicas=2).bind(), name="pid", route_prefix="/pid")
    address = _grpc_served(haproxy, "pid")
    killed: list[int] = []

    def kill_one(served: list[str]) -> None:
        if len(served) == 200:
            killed.append(min(_pids(served)))
            os.kill(killed[0], signal.SIGKILL)

    served, failed = asyncio.run(_grpc_load(address, 6.0, kill_one))
    assert len(served) > 400, len(served)
    assert len(_pids(served)) >= 2, served[:10]  # both replicas served before the kill
    assert len(failed) <= CALLERS, failed
    # UNAVAILABLE as a rule; UNKNOWN (seen once, in a fresh clone's run) when HAProxy resets a
    # stream it had begun to answer when the replica died.
    assert set(failed) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}, failed
    _grpc_served(haproxy, "pid")  # replaced
    after, failed_after = asyncio.run(_grpc_load(address, 2.0))
    assert not failed_after, failed_after
    assert killed[0] not in _pids(after)


def test_a_rolling_update_under_grpc_load_fails_no_call(haproxy: Ingress) -> None:
    """Behind HAProxy, a new version rolled out while 8 callers call: not one call fails, and
    the new version serves them all by the end."""
    serve.run(Pid.options(num_replicas=2).bind("v1"), name="pid", route_prefix="/pid")
    address = _grpc_served(haproxy, "pid")

    def update() -> None:
        time.sleep(1.0)  # under load first
        serve.run(Pid.options(num_replicas=2, version="2").bind("v2"), name="pid")

    updated = threading.Thread(target=update)
    updated.start()
    # At least 3 s, and until the update is done (serve.run returned).
    served, failed = asyncio.run(_grpc_load(address, 3.0, longer=updated.is_alive))
    updated.join(timeout=60)
    assert not failed, failed
    assert {reply.split()[0] for reply in served} == {"v1", "v2"}
