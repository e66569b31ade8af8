"""Envoy ExternalProcessor servicer: a loop that hands each phase to the stream's session.

The route names itself in the stream's gRPC metadata (``x-sidegate-route``, set per route by
the compiler: ``<api>:<version>`` for a version transform, ``<api>`` for a translation); that
picks the session: a body ``Strategy`` (versions, XML ⇄ JSON) or a gRPC ``Translator``. An
exception nobody expected ends the stream with INTERNAL, logged: Envoy then applies the
filter's failure mode.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extproc import grpc_translate
from extproc.session import GrpcSession, Session
from extproc.translators import Strategy, strategies
from sidegate import config, grpc_h2c
from sidegate.config import Gateway
from sidegate.contract import EXTPROC, ROUTE_METADATA, SIDECAR_GRPC_SERVICE, route_key
from sidegate.settings import Settings

PHASES = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)
log = logging.getLogger("extproc")

Processor = Session | GrpcSession


def sessions(gateway: Gateway, base: Path) -> dict[str, Callable[[], Processor]]:
    """A session factory for every route that calls ext_proc, keyed as the compiler names it."""
    out: dict[str, Callable[[], Processor]] = {}
    for key, strategy in strategies(gateway).items():
        out[key] = _body_session(strategy)
    for api in gateway.apis:
        # engine: envoy is Envoy's grpc_json_transcoder: no ext_proc call comes for that API.
        if api.translate is not None and api.translate.grpc is not None and api.translate.grpc.engine == "extproc":
            translator = grpc_translate.load(api.translate.grpc, base, api.translate.max_body_bytes)
            out[route_key(api.name)] = _grpc_session(translator)
    return out


def _body_session(strategy: Strategy) -> Callable[[], Processor]:
    return lambda: Session(strategy)


def _grpc_session(translator: grpc_translate.Translator) -> Callable[[], Processor]:
    return lambda: GrpcSession(translator)


class ExternalProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, routes: dict[str, Callable[[], Processor]]) -> None:
        self.routes = routes

    async def Process(  # noqa: N802 - gRPC name
        self, requests: AsyncIterator[Any], context: grpc_h2c.Context
    ) -> AsyncIterator[Any]:
        metadata = dict(context.invocation_metadata() or ())
        factory = self.routes.get(str(metadata.get(ROUTE_METADATA, "")))
        session: Processor = factory() if factory is not None else Session(None)
        async for request in requests:
            phase = request.WhichOneof("request")
            if phase not in PHASES:
                continue
            try:
                yield session.handle(phase, getattr(request, phase))
            except Exception:
                log.exception("unexpected error in Process")
                await context.abort(grpc.StatusCode.INTERNAL, "extproc internal error")


class ExtprocSidecar:
    """extproc as the server kernel hosts it (``sidegate.server.Sidecar``)."""

    service = SIDECAR_GRPC_SERVICE[EXTPROC]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servicer: ExternalProcessor | None = None

    def files(self, gateway: Gateway) -> list[Path]:
        return []  # its descriptors and protos are in ``gateway.files``

    def check(self, gateway: Gateway) -> None:
        config.verify(gateway, grpc_translate.problems(gateway))

    async def start(self, server: grpc_h2c.Server, gateway: Gateway) -> None:
        self.check(gateway)
        self.servicer = ExternalProcessor(sessions(gateway, gateway.base))
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(self.servicer, server)

    def reload(self, gateway: Gateway) -> None:
        if self.servicer is not None:
            self.servicer.routes = sessions(gateway, gateway.base)

    async def close(self) -> None:
        return None
