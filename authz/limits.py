"""Rate limits decided inside authz: one callout per request instead of two (``ratelimit.in_authz``).

Envoy's ratelimit filter costs a second gRPC call per request (~55-75 µs of Envoy CPU, more of
Python's). With ``in_authz`` the compiler leaves that filter off and authz asks the same
``Limiter`` (same rules, same Redis counters and scripts, same headers and 429 body) after it
has allowed a request. The descriptors are built from ``sidegate.contract.rate_limit_shapes``,
the list Envoy's actions are compiled from, so both paths count alike. Pure, but for the limiter.
"""

from __future__ import annotations

import dataclasses
import json

from authz.decision import JSON, Decision, Identity
from ratelimit.limiter import STORE_UNAVAILABLE, Verdict
from ratelimit.limits import Descriptor, Request
from sidegate.config import Api, Gateway
from sidegate.contract import (
    RATELIMIT_DOMAIN,
    RL_API,
    RL_CONSUMER,
    RL_DEFAULT_CONSUMER,
    RL_IP,
    RL_METHOD,
    RL_NO_PLAN,
    RL_PLAN,
    rate_limit_shapes,
)


def request(
    api: Api,
    gateway: Gateway,
    identity: Identity | None,
    method: str,
    ip: str,
    *,
    shapes: list[tuple[str, ...]] | None = None,
) -> Request | None:
    """The rate-limit request Envoy would have sent for this call, or None when nothing is counted.

    ``shapes`` is ``rate_limit_shapes(api, gateway)`` when the caller remembers it (it runs on
    every request: the Checker keeps it per API and config).
    """
    if shapes is None:
        shapes = rate_limit_shapes(api, gateway)
    if not shapes:
        return None
    values = {
        RL_API: api.name,
        RL_CONSUMER: identity.consumer if identity else RL_DEFAULT_CONSUMER,
        RL_PLAN: (identity.plan if identity else None) or RL_NO_PLAN,
        RL_IP: ip,
        RL_METHOD: method,
    }
    return Request(RATELIMIT_DOMAIN, tuple(Descriptor(tuple((k, values[k]) for k in shape)) for shape in shapes))


def apply(result: Decision, verdict: Verdict) -> Decision:
    """An allowed decision with the limiter's answer: its headers on the response, or a 429."""
    if verdict.ok:  # every field of the decision, and the limiter's headers on the response
        return dataclasses.replace(result, response_headers=tuple(verdict.headers))
    body = verdict.body or json.dumps({"error": "rate_limited", "message": "too many requests"}) + "\n"
    headers = [(k, v) for k, v in verdict.headers if k != "content-type"] + [("content-type", JSON)]
    # Logged and counted under the limiter's reason: a store failure is not a client over its limit.
    code = STORE_UNAVAILABLE if verdict.reason == STORE_UNAVAILABLE else "rate_limited"
    return Decision(False, 429, code, tuple(headers), body=body, identity=result.identity)
