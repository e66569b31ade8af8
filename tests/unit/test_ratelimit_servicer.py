"""The servicer converts proto ⇄ domain only; bad input is INVALID_ARGUMENT, never a trace."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import wrappers_pb2
from prometheus_client import REGISTRY

from ratelimit import runner, servicer
from ratelimit.errors import BadRequest
from ratelimit.limiter import Limiter, Status, Verdict
from ratelimit.limits import Descriptor, Limits, Request, Rule
from ratelimit.store import MemoryStore

Entry = ratelimit_pb2.RateLimitDescriptor.Entry
Response = rls_pb2.RateLimitResponse


def proto_descriptor(*entries: tuple[str, str], **fields: Any) -> Any:
    return ratelimit_pb2.RateLimitDescriptor(entries=[Entry(key=k, value=v) for k, v in entries], **fields)


def test_request_to_domain_with_hits_addend_and_override() -> None:
    message = rls_pb2.RateLimitRequest(
        domain="edge",
        hits_addend=3,
        descriptors=[
            proto_descriptor(("a", "1"), ("b", "")),
            proto_descriptor(("c", "2"), hits_addend=wrappers_pb2.UInt64Value(value=0)),
            proto_descriptor(
                ("d", "3"),
                limit=ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(
                    requests_per_unit=9, unit=Response.RateLimit.HOUR
                ),
            ),
        ],
    )
    assert servicer.to_request(message) == Request(
        "edge",
        (
            Descriptor((("a", "1"), ("b", ""))),
            Descriptor((("c", "2"),), hits_addend=0),
            Descriptor((("d", "3"),), override=(9, "hour")),
        ),
        hits_addend=3,
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (rls_pb2.RateLimitRequest(descriptors=[proto_descriptor(("a", "1"))]), servicer.NO_DOMAIN),
        (rls_pb2.RateLimitRequest(domain="d"), servicer.NO_DESCRIPTORS),
        (
            rls_pb2.RateLimitRequest(domain="d", descriptors=[proto_descriptor(("", "1"))]),
            "descriptor entry 0 has an empty key",
        ),
        (rls_pb2.RateLimitRequest(domain="d", descriptors=[proto_descriptor()]), "descriptor entry 0 has an empty key"),
    ],
)
def test_requests_no_envoy_sends_are_bad_requests(message: Any, reason: str) -> None:
    with pytest.raises(BadRequest, match=f"^{reason}$"):
        servicer.to_request(message)


def test_verdict_to_response() -> None:
    rule = Rule(id="r", policy="public-ip-1m", limit=10, window_ms=60_000)
    odd = Rule(id="o", policy="odd", limit=5, window_ms=30_000)
    verdict = Verdict(
        False,
        (Status(False, rule, 0, 1_500), Status(True, odd, 4, 10_000), Status(unlimited=True), Status()),
        (("retry-after", "2"),),
        '{"error": "rate_limited"}\n',
    )
    response = servicer.to_response(verdict)
    assert response.overall_code == Response.OVER_LIMIT
    first, second, unlimited, unmatched = response.statuses
    assert first.code == Response.OVER_LIMIT
    assert (first.current_limit.name, first.current_limit.requests_per_unit) == ("public-ip-1m", 10)
    assert first.current_limit.unit == Response.RateLimit.MINUTE
    assert (first.duration_until_reset.seconds, first.duration_until_reset.nanos) == (1, 500_000_000)
    assert second.code == Response.OK
    assert second.current_limit.unit == Response.RateLimit.UNKNOWN  # 30 s is no unit of the proto
    assert second.limit_remaining == 4
    assert unlimited.limit_remaining == 2**32 - 1
    assert not unmatched.HasField("current_limit")
    assert [(h.key, h.value) for h in response.response_headers_to_add] == [("retry-after", "2")]
    assert response.raw_body == b'{"error": "rate_limited"}\n'


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted


def call(service: servicer.RateLimitService, message: Any) -> tuple[Any, FakeContext]:
    context = FakeContext()

    async def go() -> Any:
        try:
            return await service.ShouldRateLimit(message, context)
        except Aborted:
            return None

    return asyncio.run(go()), context


def test_bad_input_is_invalid_argument_logged_without_a_trace(caplog: pytest.LogCaptureFixture) -> None:
    service = servicer.RateLimitService(Limiter(Limits(), MemoryStore(), lambda: 0.0))
    with caplog.at_level(logging.INFO, "ratelimit"):
        reply, context = call(service, rls_pb2.RateLimitRequest(domain="d"))
    assert reply is None
    assert context.aborted == (grpc.StatusCode.INVALID_ARGUMENT, servicer.NO_DESCRIPTORS)
    assert [r.exc_info for r in caplog.records] == [None]


def test_an_unexpected_error_is_logged_and_answered_internal(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Limiter):
        async def decide(self, request: Request) -> Verdict:
            raise RuntimeError("bug")

    service = servicer.RateLimitService(Broken(Limits(), MemoryStore(), lambda: 0.0))
    with caplog.at_level(logging.ERROR, "ratelimit"):
        _reply, context = call(
            service, rls_pb2.RateLimitRequest(domain="d", descriptors=[proto_descriptor(("a", "b"))])
        )
    assert context.aborted == (grpc.StatusCode.INTERNAL, "ratelimit internal error")
    assert caplog.records[0].getMessage() == "unexpected error in ShouldRateLimit"


def test_an_ok_decision_for_an_unknown_domain() -> None:
    service = servicer.RateLimitService(Limiter(Limits(), MemoryStore(), lambda: 0.0))
    reply, context = call(
        service, rls_pb2.RateLimitRequest(domain="nobody", descriptors=[proto_descriptor(("a", "b"))])
    )
    assert context.aborted is None
    assert reply.overall_code == Response.OK
    assert [s.code for s in reply.statuses] == [Response.OK]


def test_stats_are_logged_each_interval_with_what_changed(caplog: pytest.LogCaptureFixture) -> None:
    class Busy(Limiter):
        @property
        def degraded(self) -> bool:
            return False

    limiter = Busy(Limits(), MemoryStore(), lambda: 0.0)

    async def go() -> None:
        task = asyncio.create_task(runner.report_every(limiter, 0.01))
        limiter.stats.update({"decisions": 5, "over_limit": 2, "rule.a.public.0.over_limit": 2})
        await asyncio.sleep(0.03)
        limiter.stats.update({"decisions": 1})
        await asyncio.sleep(0.03)
        task.cancel()

    with caplog.at_level(logging.INFO, "ratelimit"):
        asyncio.run(go())
    lines = [r.fields for r in caplog.records if r.getMessage() == "rate-limit stats"]  # type: ignore[attr-defined]
    assert lines[0] == {
        "interval_s": 0.01,
        "degraded": False,
        "decisions": 5,
        "over_limit": 2,
        "rules": {"a.public.0.over_limit": 2},
    }
    assert lines[1] == {"interval_s": 0.01, "degraded": False, "decisions": 1, "rules": {}}
    assert len(lines) == 2  # nothing new, nothing logged


def test_a_refusal_by_a_failed_store_is_counted_and_logged_under_its_own_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:

    def count(reason: str) -> float:
        labels = {"sidecar": "ratelimit", "outcome": "deny", "reason": reason}
        return REGISTRY.get_sample_value("sidegate_decisions_total", labels) or 0.0

    before = count("rate_limit_store_unavailable"), count("over_limit")
    servicer._STORE_DENIALS.last = 0.0
    with caplog.at_level(logging.WARNING, logger="ratelimit"):
        servicer._record(Verdict(False, (Status(ok=False),), reason="rate_limit_store_unavailable"), 0.001)
        servicer._record(Verdict(False, (Status(ok=False),), reason="rate_limit_store_unavailable"), 0.001)
    assert count("rate_limit_store_unavailable") == before[0] + 2
    assert count("over_limit") == before[1]
    [line] = [r for r in caplog.records if "counter store is unavailable" in r.getMessage()]  # once a second
    assert line.levelno == logging.WARNING
