"""Envoy ext_authz gRPC servicer: CheckRequest → ``decide`` → CheckResponse. Conversion only."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.decision import CheckInput, Decision, decide
from sidegate import logs
from sidegate.config import Gateway
from sidegate.settings import Settings

SERVICE = "envoy.service.auth.v3.Authorization"
log = logging.getLogger("authz")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(name: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def to_response(decision: Decision) -> Any:
    headers = [_header(k, v) for k, v in decision.headers]
    if decision.allowed:
        metadata = struct_pb2.Struct()
        metadata.update(dict(decision.metadata))
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(headers=headers, headers_to_remove=list(decision.remove)),
            dynamic_metadata=metadata,
        )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=code_pb2.UNAUTHENTICATED if decision.status == 401 else code_pb2.PERMISSION_DENIED
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status), headers=headers, body=decision.body
        ),
    )


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802 - gRPC name
        http = request.attributes.request.http
        check = CheckInput(
            api=request.attributes.context_extensions.get("api"),
            method=http.method,
            path=http.path,
            headers=http.headers,
        )
        decision = decide(check, self.gateway)
        if not decision.allowed:
            log.info(
                "denied",
                extra=logs.fields(
                    code=decision.code,
                    status=decision.status,
                    api=check.api,
                    method=check.method,
                    request_id=http.headers.get("x-request-id"),
                ),
            )
        return to_response(decision)


def register(server: grpc.aio.Server, gateway: Gateway, settings: Settings) -> None:
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(gateway), server)
