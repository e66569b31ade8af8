"""Envoy RateLimitService servicer: RateLimitRequest → ``Limiter.decide`` → RateLimitResponse.

The servicer converts proto ⇄ domain and nothing else. A request no Envoy would send (no domain,
no descriptors, an entry without a key) is answered INVALID_ARGUMENT with a one-line reason; an
exception nobody expected is logged and answered INTERNAL, which Envoy turns into its
configured ``failure_mode``. ``setup`` wires the limiter: limits from gateway.yaml and the
reference configs, counters in Redis when a URL is set (else in memory), hot reload, and a
stats line in the log every minute (decisions, refusals, store errors, ``degraded``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2

from ratelimit.errors import BadRequest
from ratelimit.limiter import STORE_UNAVAILABLE, Limiter, Verdict
from ratelimit.limits import UNIT_MS, Descriptor, Request
from ratelimit.runner import LimiterRunner
from sidegate import grpc_h2c, logs, telemetry
from sidegate.config import Gateway
from sidegate.contract import RATELIMIT, SIDECAR_GRPC_SERVICE
from sidegate.settings import Settings

log = logging.getLogger("ratelimit")

_Response = rls_pb2.RateLimitResponse
_OK, _OVER = _Response.OK, _Response.OVER_LIMIT
_UNIT_NAMES = {value: name.lower() for name, value in _Response.RateLimit.Unit.items()}
_UNIT_BY_MS = {ms: _Response.RateLimit.Unit.Value(name.upper()) for name, ms in UNIT_MS.items()}
_UNLIMITED_REMAINING = 2**32 - 1  # what the reference answers for an unlimited descriptor
NO_DOMAIN = "rate limit domain must not be empty"
NO_DESCRIPTORS = "rate limit descriptor list must not be empty"
EMPTY_KEY = "descriptor entry {index} has an empty key"


class _Throttled:
    """One log line per ``every`` seconds for an event that may repeat thousands of times a
    second (every request during a Redis outage), with how many happened since the last."""

    def __init__(self, message: str, every: float = 1.0) -> None:
        self.message = message
        self.every = every
        self.count = 0
        self.last = 0.0

    def note(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            log.warning(self.message, extra=logs.fields(code=STORE_UNAVAILABLE, requests=self.count))
            self.count, self.last = 0, now


_STORE_DENIALS = _Throttled(
    "refused: the counter store is unavailable and the limit fails closed (on_store_error: deny)"
)


def to_request(message: Any) -> Request:
    """The domain view of a RateLimitRequest; ``BadRequest`` for what no Envoy sends."""
    if not message.domain:
        raise BadRequest(NO_DOMAIN)
    if not message.descriptors:
        raise BadRequest(NO_DESCRIPTORS)
    descriptors = []
    for index, descriptor in enumerate(message.descriptors):
        entries = tuple((entry.key, entry.value) for entry in descriptor.entries)
        if not entries or any(not key for key, _ in entries):
            raise BadRequest(EMPTY_KEY.format(index=index))
        hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else None
        override = None
        if descriptor.HasField("limit"):
            override = (descriptor.limit.requests_per_unit, _UNIT_NAMES.get(descriptor.limit.unit, "second"))
        descriptors.append(Descriptor(entries, hits, override))
    return Request(message.domain, tuple(descriptors), message.hits_addend)


def to_response(verdict: Verdict) -> Any:
    statuses = []
    for status in verdict.statuses:
        if status.rule is None:
            remaining = _UNLIMITED_REMAINING if status.unlimited else 0
            statuses.append(_Response.DescriptorStatus(code=_OK, limit_remaining=remaining))
            continue
        rule = status.rule
        if rule.reference:  # the reference's answer: its rule name, whole seconds from 1 to the unit
            name, seconds, ms = rule.name, max(1, -(-status.reset_ms // 1000)), 0
        else:
            name = rule.policy
            seconds, ms = divmod(status.reset_ms, 1000)
        statuses.append(
            _Response.DescriptorStatus(
                code=_OK if status.ok else _OVER,
                current_limit=_Response.RateLimit(
                    name=name, requests_per_unit=rule.limit, unit=_UNIT_BY_MS.get(rule.window_ms, 0)
                ),
                limit_remaining=min(status.remaining, _UNLIMITED_REMAINING),
                duration_until_reset=duration_pb2.Duration(seconds=seconds, nanos=ms * 1_000_000),
            )
        )
    return _Response(
        overall_code=_OK if verdict.ok else _OVER,
        statuses=statuses,
        response_headers_to_add=[base_pb2.HeaderValue(key=k, value=v) for k, v in verdict.headers],
        raw_body=verdict.body.encode(),
    )


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def ShouldRateLimit(self, request: Any, context: grpc_h2c.Context) -> Any:  # noqa: N802
        started = time.perf_counter()
        try:
            with telemetry.span("ratelimit.decide", telemetry.carrier(context)) as span:
                verdict = await self.limiter.decide(to_request(request))
                if span.is_recording():
                    span.set_attribute("sidegate.outcome", "allow" if verdict.ok else verdict.reason)
        except BadRequest as exc:
            log.info("bad request", extra=logs.fields(code=exc.code, reason=str(exc), domain=request.domain[:100]))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            log.exception("unexpected error in ShouldRateLimit", extra=logs.fields(domain=request.domain[:100]))
            await context.abort(grpc.StatusCode.INTERNAL, "ratelimit internal error")
        _record(verdict, time.perf_counter() - started)
        return to_response(verdict)


def _record(verdict: Verdict, seconds: float) -> None:
    """Metrics of one decision: labels are rule policies from the config, never descriptor values.
    A refusal by ``on_store_error: deny`` is counted, and logged (at most once a second), under
    its own reason: it says the store is down, not that a client went over a limit."""
    outcome = "allow" if verdict.ok else verdict.reason
    telemetry.decision("ratelimit", "allow" if verdict.ok else "deny", outcome, seconds)
    if verdict.reason == STORE_UNAVAILABLE:
        _STORE_DENIALS.note()
    for status in verdict.statuses:
        rule = status.rule
        if rule is None or rule.unlimited:
            continue
        if not status.ok:
            if verdict.reason == STORE_UNAVAILABLE and not rule.shadow:
                continue  # its counter was never read: no hit to count
            result = "shadow" if rule.shadow else "over_limit"
        else:
            result = "near_limit" if status.remaining <= rule.limit // 10 else "ok"
        telemetry.count(telemetry.RATELIMIT_HITS, rule.policy, result)


class RateLimitSidecar:
    """The rate-limit service as the server kernel hosts it (``sidegate.server.Sidecar``)."""

    service = SIDECAR_GRPC_SERVICE[RATELIMIT]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner = LimiterRunner(settings)

    def files(self, gateway: Gateway) -> list[Path]:
        return self.runner.files()

    def check(self, gateway: Gateway) -> None:
        self.runner.check(gateway)

    async def start(self, server: grpc_h2c.Server, gateway: Gateway) -> None:
        limiter = await self.runner.start(gateway)
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(limiter), server)
        log.info(
            "rate limits loaded",
            extra=logs.fields(
                store="redis" if self.settings.redis_url else "memory",
                rules=sum(1 for _ in limiter.limits.rules()),
                domains=sorted(limiter.limits.domains),
            ),
        )

    def reload(self, gateway: Gateway) -> None:
        self.runner.reload(gateway)

    async def close(self) -> None:
        await self.runner.close()
