"""A ``grpc_h2c`` server for the attack suite, in a process of its own so its memory can be read
alone: the gRPC health service, ``/t.T/Echo`` (unary) and ``/t.T/Hold`` (a stream that never
reads). Limits come as JSON in argv[1] (field -> value of ``Limits``); argv[2] may name the
other server, ``grpc.aio``, to compare (the limits do not apply to it). Prints its port, then
serves until SIGTERM. Anything that reaches the event loop's exception handler is printed to
stderr, where the tests look for it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from sidegate import grpc_h2c


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def hold(requests: Any, context: Any) -> Any:
    await asyncio.sleep(3600)
    yield b""


async def main() -> None:
    layer = sys.argv[2] if len(sys.argv) > 2 else "grpc_h2c"
    server: Any = (
        grpc.aio.server() if layer == "grpc.aio" else grpc_h2c.Server(grpc_h2c.Limits(**json.loads(sys.argv[1])))
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.T",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Hold": grpc.stream_stream_rpc_method_handler(hold),
                },
            )
        ]
    )
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.set_exception_handler(lambda _loop, context: print("EVENT LOOP EXCEPTION", context, file=sys.stderr))
    print(port, flush=True)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main())
