"""A sidecar module for kernel tests: an Authorization service whose Check takes 1 s.

Run as ``python -m tests.integration.slow_sidecar CONFIG PORT GRACE``: it serves on the real
kernel (``sidegate.server.serve``) and prints ``ready`` when the port is bound.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from sidegate import config, server
from sidegate.settings import Settings

SERVICE = "envoy.service.auth.v3.Authorization"
DELAY = 1.0


class SlowAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.sleep(DELAY)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


class SlowSidecar:
    """A ``sidegate.server.Sidecar`` serving ``SlowAuthorization``."""

    service = SERVICE

    def files(self, gateway: Any) -> list[Path]:
        return []

    def check(self, gateway: Any) -> None:
        return None

    async def start(self, server: Any, gateway: Any) -> None:
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(SlowAuthorization(), server)

    def reload(self, gateway: Any) -> None:
        return None

    async def close(self) -> None:
        return None


if __name__ == "__main__":
    path, port, grace = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    settings = Settings(config=path, port=port, grace=grace, workers=1)
    ready = lambda _port: print("ready", flush=True)  # noqa: E731
    asyncio.run(server.serve(settings, [SlowSidecar()], config.load(path), ready))
