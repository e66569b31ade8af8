"""The authz decision: a pure function from a request to a ``Decision``. No grpc, no I/O.

The Envoy route names its API in the check's context extensions (``api``); the API's ``auth``
section says what it requires. Routes without one are denied (fail closed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from authz import errors
from authz.errors import Denial
from sidegate.compiler import IDENTITY_HEADERS
from sidegate.config import Gateway

JSON = "application/json"


@dataclass(frozen=True)
class CheckInput:
    """What authz needs of an Envoy CheckRequest."""

    api: str | None
    method: str
    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    code: str = "ok"
    # Added to the upstream request (allow) or to the client response (deny).
    headers: tuple[tuple[str, str], ...] = ()
    # Removed from the upstream request on allow: client-forged identity headers.
    remove: tuple[str, ...] = ()
    body: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


def deny(denial: Denial) -> Decision:
    headers = [("content-type", JSON)]
    if denial.http_status == 401:
        headers.append(("www-authenticate", 'Bearer realm="sidegate"'))
    body = json.dumps({"error": denial.code, "message": denial.message}) + "\n"
    return Decision(False, denial.http_status, denial.code, tuple(headers), body=body)


ALLOW_ANONYMOUS = Decision(True, code="anonymous", headers=(("x-auth-method", "anonymous"),), remove=IDENTITY_HEADERS)


def decide(request: CheckInput, gateway: Gateway) -> Decision:
    api = gateway.api(request.api) if request.api else None
    if api is None:
        return deny(errors.UNKNOWN_API)
    if api.auth.anonymous:
        return ALLOW_ANONYMOUS
    return deny(errors.MISSING_CREDENTIALS)
