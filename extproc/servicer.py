"""Envoy ExternalProcessor servicer: a loop that hands each phase to the stream's ``Session``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extproc.session import Session
from sidegate.config import Gateway
from sidegate.settings import Settings

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(  # noqa: N802 - gRPC name
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        session = Session()
        async for request in requests:
            phase = request.WhichOneof("request")
            if phase is None:
                continue
            yield session.handle(phase, getattr(request, phase))


async def setup(server: grpc.aio.Server, gateway: Gateway, settings: Settings) -> None:
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(), server)
