"""Envoy ExternalProcessor servicer: a loop that hands each phase to the stream's ``Session``.

The route names itself in the stream's gRPC metadata (``x-sidegate-route: <api>:<version>``,
set per route by the compiler); that picks the transform chain. An exception nobody expected
ends the stream with INTERNAL, logged: Envoy then applies the filter's failure mode.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extproc.session import Session
from extproc.transforms import Chain, chains
from sidegate.config import Gateway
from sidegate.settings import Settings
from sidegate.versioning import ROUTE_METADATA

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
log = logging.getLogger("extproc")


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, routes: dict[str, Chain]) -> None:
        self.routes = routes

    async def Process(  # noqa: N802 - gRPC name
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        metadata = dict(context.invocation_metadata() or ())
        session = Session(self.routes.get(str(metadata.get(ROUTE_METADATA, ""))))
        async for request in requests:
            phase = request.WhichOneof("request")
            if phase is None or phase not in (
                "request_headers",
                "request_body",
                "request_trailers",
                "response_headers",
                "response_body",
                "response_trailers",
            ):
                continue
            try:
                yield session.handle(phase, getattr(request, phase))
            except Exception:
                log.exception("unexpected error in Process")
                await context.abort(grpc.StatusCode.INTERNAL, "extproc internal error")


async def setup(server: grpc.aio.Server, gateway: Gateway, settings: Settings) -> None:
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(chains(gateway)), server)
