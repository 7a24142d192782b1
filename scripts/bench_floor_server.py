"""The raw gRPC floor for `make bench`: a bare grpc.aio server in its own process (uvloop).

Unary `Echo` returns its request; server-streaming `Stream` answers a request
`u32 count | item` with `count` copies of `item`; bidirectional `Mux` echoes every message it
reads (the client multiplexes many requests over it, see scripts/bench_stream_floor.py). Raw
bytes, no protobuf, no serve code: the least any gRPC-based design can cost on this machine.
Prints the port on stdout.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import uvloop

OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    (count,) = struct.unpack_from("<I", request)
    item = request[4:]
    for _ in range(count):
        yield item


async def mux(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def main() -> None:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "floor.Floor",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                    "Mux": grpc.stream_stream_rpc_method_handler(mux),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await server.stop(0)


if __name__ == "__main__":
    uvloop.run(main())
