"""gRPC ingress through real daemons: the proxy forwards user-defined gRPC methods (it has no
copy of the protos) to the ingress deployment's methods; a grpc client with generated stubs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serve
import serve.context
import serve.exceptions
from serve.generated import serve_pb2, serve_pb2_grpc
from serve.grpc_util import RayServegRPCContext, gRPCInputStream
from serve.handle import DeploymentHandle
from tests.support import greeter_pb2, greeter_pb2_grpc
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

    async def CountTo(self, request: greeter_pb2.HelloRequest) -> Iterator[greeter_pb2.HelloReply]:
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
    def __init__(self, inner: DeploymentHandle) -> None:
        self.inner = inner

    async def SayHello(self, request: greeter_pb2.HelloRequest) -> greeter_pb2.HelloReply:
        try:
            return greeter_pb2.HelloReply(message=await self.inner.work.remote(request.name))
        except serve.exceptions.RequestTimeoutError as exc:
            Path(f"{request.name}.relay").write_text(type(exc).__name__)  # noqa: ASYNC240
            raise


@pytest.fixture
def channel(serve_instance: None) -> Iterator[grpc.Channel]:
    address = proxy_details().grpc_address
    assert address, "the shared proxy serves gRPC (see conftest.serve_session)"
    with grpc.insecure_channel(address) as channel:
        yield channel


def test_unary_and_server_streaming_methods(channel: grpc.Channel) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    stub = greeter_pb2_grpc.GreeterStub(channel)
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
    channel: grpc.Channel,
) -> None:
    serve.run(Greeter.bind("Hello"), name="en", route_prefix="/en")
    serve.run(Greeter.bind("Bonjour"), name="fr", route_prefix="/fr")
    stub = greeter_pb2_grpc.GreeterStub(channel)
    request = greeter_pb2.HelloRequest(name="Ada")
    fr = stub.SayHello(
        request, metadata=(("application", "fr"), ("multiplexed_model_id", "m7")), timeout=10
    )
    assert fr.message == "Bonjour Ada [m7]"
    assert stub.SayHello(request, metadata=(("application", "en"),), timeout=10).message == (
        "Hello Ada [-]"
    )
    with pytest.raises(grpc.RpcError) as unknown:
        stub.SayHello(request, metadata=(("application", "de"),), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'de'" in unknown.value.details()
    with pytest.raises(grpc.RpcError) as ambiguous:
        stub.SayHello(request, timeout=10)  # two applications and no metadata
    assert ambiguous.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_deadline_is_deadline_exceeded(channel: grpc.Channel) -> None:
    serve.run(SlowGreeter.bind(), name="slow", route_prefix="/slow")
    stub = greeter_pb2_grpc.GreeterStub(channel)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        stub.SayHello(greeter_pb2.HelloRequest(name="x"), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10


def test_the_client_deadline_travels_to_nested_calls(channel: grpc.Channel, tmp_path: Path) -> None:
    serve.run(Relay.bind(Inner.bind()), name="relay", route_prefix="/relay")
    marker = tmp_path / "inner"
    stub = greeter_pb2_grpc.GreeterStub(channel)
    with pytest.raises(grpc.RpcError) as late:
        stub.SayHello(greeter_pb2.HelloRequest(name=str(marker)), timeout=1.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(marker.exists, timeout_s=10)  # the inner replica's work was cancelled
    assert marker.read_text() == "cancelled"
    relay = Path(f"{marker}.relay")
    wait_for(relay.exists, timeout_s=10)  # the nested call failed with the deadline's error
    assert relay.read_text() == "RequestTimeoutError"


def test_standard_health_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", ["/greeter.Greeter/NoSuchMethod", "/no.such.Service/SayHello"])
def test_unknown_method_is_unimplemented(channel: grpc.Channel, method: str) -> None:
    """As a gRPC server answers an unknown service or method: UNIMPLEMENTED, naming it."""
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    call = channel.unary_unary(method)
    with pytest.raises(grpc.RpcError) as error:
        call(b"", timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert method in error.value.details()


def test_undecodable_message_is_invalid_argument(channel: grpc.Channel) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    call = channel.unary_unary("/greeter.Greeter/SayHello")
    with pytest.raises(grpc.RpcError) as error:
        call(b"\xff\xff\xff\xff garbage", timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decode" in error.value.details()
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

    async def JoinNames(self, requests: gRPCInputStream) -> greeter_pb2.HelloReply:
        names = [request.name async for request in requests]
        return greeter_pb2.HelloReply(message=",".join(names))

    async def Echo(self, requests: gRPCInputStream) -> AsyncIterator[greeter_pb2.HelloReply]:
        async for request in requests:
            yield greeter_pb2.HelloReply(message=request.name.upper())


def test_grpc_context_reads_metadata_and_sets_status_and_trailers(channel: grpc.Channel) -> None:
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    stub = greeter_pb2_grpc.GreeterStub(channel)
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
    assert "not for you" in denied.value.details()


def test_client_streaming_and_bidirectional_streaming(channel: grpc.Channel) -> None:
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    stub = greeter_pb2_grpc.GreeterStub(channel)
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


def test_bidirectional_streaming_answers_each_message_as_it_comes(
    serve_instance: None,
) -> None:
    """A reply arrives before the client sends its next message: the call really streams."""
    serve.run(Contextual.bind(), name="ctx", route_prefix="/ctx")
    address = proxy_details().grpc_address

    async def talk() -> list[str]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = greeter_pb2_grpc.GreeterStub(channel)
            call = stub.Echo(metadata=(("application", "ctx"),), timeout=30)
            heard = []
            for name in ("x", "y", "z"):
                await call.write(greeter_pb2.HelloRequest(name=name))
                heard.append((await call.read()).message)
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            return heard

    assert asyncio.run(talk()) == ["X", "Y", "Z"]


def test_ray_serve_api_service(channel: grpc.Channel) -> None:
    serve.run(Greeter.bind("Hello"), name="greet", route_prefix="/greet")
    stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
    listed = stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=10)
    assert "greet" in listed.application_names
    assert stub.Healthz(serve_pb2.HealthzRequest(), timeout=10).message == "success"


def test_not_found_says_where_to_look(channel: grpc.Channel) -> None:
    serve.run(Greeter.bind("Hello"), name="en", route_prefix="/en")
    serve.run(Greeter.bind("Bonjour"), name="fr", route_prefix="/fr")
    stub = greeter_pb2_grpc.GreeterStub(channel)
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
    assert unset.value.details().startswith("Application metadata not set.")
