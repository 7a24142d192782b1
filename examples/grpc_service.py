"""A gRPC service behind serve's proxy: the four kinds of method, the call's context, and Ray's
RayServeAPIService. Run it: ``python examples/grpc_service.py``.

The proxy needs none of the service's protos: it forwards raw messages by method path, and the
ingress deployment decodes them with the servicer function named in ``grpc_options``. The
``application`` metadata picks the application when there are several.
"""

import asyncio
import os

import grpc

import serve
from examples import hello_pb2, hello_pb2_grpc
from serve.generated import serve_pb2, serve_pb2_grpc
from serve.grpc_util import RayServegRPCContext, gRPCInputStream


@serve.deployment
class Greeter:
    def SayHello(self, request, grpc_context: RayServegRPCContext):
        user = dict(grpc_context.invocation_metadata()).get("user", "stranger")
        if not request.name:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details("name is required")
            return hello_pb2.HelloReply()
        grpc_context.set_trailing_metadata([("greeted-by", "serve")])
        return hello_pb2.HelloReply(message=f"Hello {request.name}, from {user}'s call")

    async def CountTo(self, request):
        for i in range(1, request.count + 1):
            yield hello_pb2.HelloReply(message=f"{request.name} {i}")

    async def Join(self, requests: gRPCInputStream):
        return hello_pb2.HelloReply(message=" & ".join([r.name async for r in requests]))

    async def Chat(self, requests: gRPCInputStream):
        async for request in requests:
            yield hello_pb2.HelloReply(message=request.name[::-1])


async def main(address: str) -> None:
    metadata = (("application", "greeter"), ("user", "ada"))
    async with grpc.aio.insecure_channel(address) as channel:
        api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        print(
            "applications:",
            list(
                (await api.ListApplications(serve_pb2.ListApplicationsRequest())).application_names
            ),
        )
        print("healthz:", (await api.Healthz(serve_pb2.HealthzRequest())).message)

        stub = hello_pb2_grpc.GreeterStub(channel)
        call = stub.SayHello(hello_pb2.HelloRequest(name="Bob"), metadata=metadata)
        print((await call).message, dict(await call.trailing_metadata())["greeted-by"])
        try:
            await stub.SayHello(hello_pb2.HelloRequest(), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            print("refused:", error.code().name, error.details())

        counted = stub.CountTo(hello_pb2.HelloRequest(name="n", count=3), metadata=metadata)
        print([reply.message async for reply in counted])

        names = (hello_pb2.HelloRequest(name=n) for n in ("ham", "eggs", "spam"))
        print((await stub.Join(names, metadata=metadata)).message)

        chat = stub.Chat(metadata=metadata)
        for word in ("stressed", "drawer"):
            await chat.write(hello_pb2.HelloRequest(name=word))
            print("chat:", word, "->", (await chat.read()).message)
        await chat.done_writing()


if __name__ == "__main__":
    serve.start(
        grpc_options={
            "port": int(os.environ.get("SERVE_DEFAULT_GRPC_PORT", "9000")),
            "grpc_servicer_functions": ["examples.hello_pb2_grpc.add_GreeterServicer_to_server"],
        }
    )
    serve.run(Greeter.bind(), name="greeter")
    grpc_address = next(iter(serve.status().proxy_details.values())).grpc_address
    asyncio.run(main(grpc_address))
    serve.shutdown()
