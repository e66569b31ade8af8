"""Envoy ext_authz gRPC servicer: CheckRequest → ``CheckInput`` → the ``Checker`` → ``Decision`` → CheckResponse.

The servicer converts proto ⇄ domain and keeps the telemetry; the decision is the Checker's
(``authz.checker``) and the wiring the sidecar's (``authz.sidecar``). It never raises for client
input; an exception nobody expected is logged and answered INTERNAL, which Envoy turns into its
configured failure status.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.checker import Checker
from authz.decision import CheckInput, Decision
from authz.memo import Memo
from sidegate import grpc_h2c, logs, telemetry

ALLOWED_LOG_EVERY = 100  # allowed requests are logged 1 in N (every denial is)
log = logging.getLogger("authz")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CODES = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED, 503: code_pb2.UNAVAILABLE}


def _header(name: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def to_response(result: Decision) -> Any:
    if result.allowed:
        return _allowed(result)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_CODES.get(result.status, code_pb2.PERMISSION_DENIED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=result.status), headers=headers_of(result.headers), body=result.body
        ),
    )


def headers_of(pairs: tuple[tuple[str, str], ...]) -> list[Any]:
    return [_header(k, v) for k, v in pairs]


ALLOWED_CACHE = 10_000  # distinct consumer and API answers kept
_ALLOWED: Memo[tuple[Any, ...], Any] = Memo(ALLOWED_CACHE)  # an allowed answer → its response, read-only
SHADOW_DENIED = "shadow mode: would have denied"


def _allowed(result: Decision) -> Any:
    """An allowed decision's response: built once per distinct answer (the same consumer on the
    same API gets the same headers and metadata), plus the per-request rate-limit fields if any."""
    key = (result.headers, result.remove, result.remove_query, tuple(result.metadata.items()))
    response = _ALLOWED.get(key)
    if response is None:
        metadata = struct_pb2.Struct()
        metadata.update(dict(result.metadata))
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=headers_of(result.headers),
                headers_to_remove=list(result.remove),
                query_parameters_to_remove=list(result.remove_query),
            ),
            dynamic_metadata=metadata,
        )
        _ALLOWED.put(key, response)
    if not result.response_headers:
        return response  # shared: grpc only serializes it
    own = external_auth_pb2.CheckResponse()
    own.CopyFrom(response)
    added = own.ok_response.response_headers_to_add
    for name, value in result.response_headers:
        added.add(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)
    return own


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``Check``: the CheckRequest as a ``CheckInput``, the ``Checker``'s decision, a CheckResponse;
    and the telemetry of each (metrics, a span, a sampled log line, shadow-mode denials)."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker

    async def Check(self, request: Any, context: grpc_h2c.Context) -> Any:  # noqa: N802
        attributes = request.attributes
        http = attributes.request.http
        extensions = attributes.context_extensions
        check = CheckInput(
            api=extensions.get("api"),
            method=http.method,
            path=http.path,
            headers=http.headers,
            context=extensions,
            source=attributes.source.address.socket_address.address if "limits" in extensions else "",
        )
        started = time.perf_counter()
        # Envoy's call carries the trace (traceparent) in its gRPC metadata.
        carrier = telemetry.carrier(context)
        with telemetry.span("authz.check", carrier) as span:
            try:
                result = await self.checker.check(check)
            except Exception:
                log.exception("unexpected error in Check", extra=logs.fields(api=check.api, method=check.method))
                telemetry.DECISIONS.labels("authz", "error", "internal").inc()
                await context.abort(grpc.StatusCode.INTERNAL, "authz internal error")
            outcome = "allow" if result.allowed else "deny"
            if span.is_recording():
                span.set_attribute("sidegate.outcome", outcome)
                span.set_attribute("sidegate.reason", result.code)
                span.set_attribute("sidegate.api", check.api or "")
                if result.identity is not None:
                    span.set_attribute("sidegate.consumer", result.identity.consumer)
        telemetry.decision("authz", outcome, result.code, time.perf_counter() - started)
        traceparent = carrier.get("traceparent") or check.headers.get("traceparent", "")
        if result.shadow_status:
            _shadow(check, result, traceparent)
        else:
            _log(check, result, traceparent)
        return to_response(result)


def _log(check: CheckInput, result: Decision, traceparent: str) -> None:
    """One JSON line per denial, and for one allowed request in ``ALLOWED_LOG_EVERY``."""
    if result.allowed and random.random() >= 1 / ALLOWED_LOG_EVERY:  # noqa: S311 - sampling, not security
        return
    log.info(
        "allowed" if result.allowed else "denied",
        extra=logs.fields(
            code=result.code,
            status=result.status,
            api=check.api,
            method=check.method,
            consumer=result.identity.consumer if result.identity else None,
            request_id=check.headers.get("x-request-id"),
            trace_id=telemetry.trace_id(traceparent),
        ),
    )


def _shadow(check: CheckInput, result: Decision, traceparent: str) -> None:
    """A request an API in shadow mode let through that authz would have denied: every one is
    counted (``sidegate_authz_shadow_denials``, by API, would-be status and reason) and logged."""
    status = str(result.shadow_status)
    telemetry.SHADOW_DENIALS.labels(check.api or "", status, result.code).inc()
    log.info(
        SHADOW_DENIED,
        extra=logs.fields(
            code=result.code,
            status=result.shadow_status,
            api=check.api,
            method=check.method,
            request_id=check.headers.get("x-request-id"),
            trace_id=telemetry.trace_id(traceparent),
        ),
    )
