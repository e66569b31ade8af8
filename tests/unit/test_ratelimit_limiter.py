"""The decision: headers, 429 body, shadow mode, the over-limit cache, store-error policies, reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
import yaml

from ratelimit import limits
from ratelimit.algorithms import Check
from ratelimit.errors import StoreUnavailable
from ratelimit.limiter import RATE_LIMITED_MESSAGE, Limiter, Verdict, sf_string
from ratelimit.limits import Descriptor, Request
from ratelimit.store import Answer, MemoryStore
from sidegate import config
from tests.conftest import FakeClock

T0 = 1_700_000_040.0


class CountingStore(MemoryStore):
    """A memory store that counts the groups it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.groups = 0

    async def apply(self, groups: Sequence[Sequence[Check]], now_ms: int) -> list[Answer]:
        self.groups += len(groups)
        return await super().apply(groups, now_ms)


class DownStore(MemoryStore):
    """A store that cannot answer."""

    @property
    def degraded(self) -> bool:
        return True

    async def apply(self, groups: Sequence[Sequence[Check]], now_ms: int) -> list[Answer]:
        return [StoreUnavailable("down")] * len(groups)


def gateway_limits(rules: list[dict[str, Any]], **ratelimit: Any) -> limits.Limits:
    doc = {
        "listeners": [{"name": "http", "port": 8080}],
        "services": {"echo": {"endpoints": ["127.0.0.1:9080"]}},
        "ratelimit": ratelimit,
        "apis": [{"name": "public", "match": {"prefix": "/public"}, "service": "echo", "limits": rules}],
    }
    return limits.from_gateway(config.parse(yaml.safe_dump(doc)))


def by_ip(ip: str = "10.0.0.1", method: str = "GET") -> Request:
    return Request("sidegate", (Descriptor((("api", "public"), ("remote_address", ip), ("method", method))),))


def decide(limiter: Limiter, req: Request | None = None) -> Verdict:
    return asyncio.run(limiter.decide(req or by_ip()))


def run_many(limiter: Limiter, count: int, req: Request | None = None) -> list[Verdict]:
    async def many() -> list[Verdict]:
        return [await limiter.decide(req or by_ip()) for _ in range(count)]

    return asyncio.run(many())


IP_3_PER_10S = [{"by": "ip", "requests": 3, "window": "10s"}]


# --- headers and the 429 ------------------------------------------------------------------


def test_ietf_fields_on_every_decision_and_retry_after_and_json_on_429() -> None:
    clock = FakeClock(T0 + 4)  # 4 s into a 10 s window
    limiter = Limiter(gateway_limits(IP_3_PER_10S), MemoryStore(), clock)
    first, _, third, refused = run_many(limiter, 4)
    assert first.ok
    assert first.headers == (
        ("ratelimit-policy", '"public-ip-10s";q=3;w=10'),
        ("ratelimit", '"public-ip-10s";r=2;t=6'),
    )
    assert third.headers[1] == ("ratelimit", '"public-ip-10s";r=0;t=6')
    assert not refused.ok
    assert refused.headers == (
        ("ratelimit-policy", '"public-ip-10s";q=3;w=10'),
        ("ratelimit", '"public-ip-10s";r=0;t=6'),
        ("retry-after", "6"),
        ("content-type", "application/json"),
    )
    assert json.loads(refused.body) == {
        "error": "rate_limited",
        "message": RATE_LIMITED_MESSAGE,
        "retry_after": 6,
        "policies": ["public-ip-10s"],
    }
    assert [s.ok for s in refused.statuses] == [False]


def test_several_limits_most_constraining_first() -> None:
    rules = [
        {"by": "ip", "requests": 100, "window": "1m", "name": "sustained"},
        {"by": "ip", "requests": 2, "window": "1s", "name": "burst", "algorithm": "gcra"},
    ]
    limiter = Limiter(gateway_limits(rules), MemoryStore(), FakeClock(T0 + 0.5))
    first = decide(limiter)
    assert dict(first.headers) == {
        "ratelimit-policy": '"burst";q=2;w=1, "sustained";q=100;w=60',
        "ratelimit": '"burst";r=1;t=1, "sustained";r=99;t=60',
    }


def test_x_ratelimit_headers_by_switch() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S), MemoryStore(), FakeClock(T0 + 4), headers="x-ratelimit")
    assert decide(limiter).headers == (
        ("x-ratelimit-limit", "3, 3;w=10"),
        ("x-ratelimit-remaining", "2"),
        ("x-ratelimit-reset", "6"),
    )


def test_headers_off_keeps_only_retry_after_on_429() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S), MemoryStore(), FakeClock(T0), headers="off")
    verdicts = run_many(limiter, 4)
    assert verdicts[0].headers == ()
    assert verdicts[3].headers == (("retry-after", "10"), ("content-type", "application/json"))


def test_policy_names_are_structured_field_strings() -> None:
    assert sf_string("plain-name") == '"plain-name"'
    assert sf_string('a "quoted" \\ name') == '"a \\"quoted\\" \\\\ name"'
    assert sf_string("ünïcode\n") == '"?n?code?"'


def test_a_request_no_limit_applies_to_is_ok_without_headers() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S), MemoryStore(), FakeClock(T0))
    verdict = decide(limiter, Request("sidegate", (Descriptor((("api", "other"),)),)))
    assert verdict == Verdict(True, (verdict.statuses[0],))
    assert verdict.statuses[0].rule is None


# --- shadow mode --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["rule", "global"])
def test_shadow_mode_counts_and_reports_but_never_denies(where: str) -> None:
    rule = {"by": "ip", "requests": 1, "window": "10s"}
    if where == "rule":
        rule["shadow_mode"] = True
        made = gateway_limits([rule])
    else:
        made = gateway_limits([rule], shadow_mode=True)
    limiter = Limiter(made, MemoryStore(), FakeClock(T0))
    verdicts = run_many(limiter, 5)
    assert all(v.ok for v in verdicts)
    assert all(v.headers == () for v in verdicts)  # a shadow limit is invisible to clients
    assert limiter.stats["rule.a.public.0.shadow_mode"] == 4
    assert limiter.stats["over_limit"] == 0


# --- the over-limit cache -----------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
def test_keys_over_their_limit_skip_the_store_until_the_window_ends(cache: bool) -> None:
    clock, store = FakeClock(T0), CountingStore()
    limiter = Limiter(gateway_limits(IP_3_PER_10S), store, clock, over_limit_cache=cache)
    verdicts = run_many(limiter, 10)
    assert [v.ok for v in verdicts] == [True] * 3 + [False] * 7
    assert store.groups == (4 if cache else 10)
    assert verdicts[-1].headers[1] == ("ratelimit", '"public-ip-10s";r=0;t=10')
    other = decide(limiter, by_ip("10.0.0.2"))  # another key is not affected
    assert other.ok
    clock.now = T0 + 10  # the window ended: the store is asked again
    assert decide(limiter).ok
    assert store.groups == (6 if cache else 12)


def test_reload_puts_new_limits_in_force_and_forgets_cached_refusals() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S), MemoryStore(), FakeClock(T0))
    assert not run_many(limiter, 4)[-1].ok
    limiter.reload(gateway_limits([{"by": "ip", "requests": 10, "window": "10s"}]), headers="off")
    after = decide(limiter)
    assert after.ok  # a fresh count: 10 per 10 s, no cached refusal
    assert after.headers == ()


def test_reload_keeps_cached_refusals_of_rules_that_did_not_change() -> None:
    store = CountingStore()
    limiter = Limiter(gateway_limits(IP_3_PER_10S), store, FakeClock(T0))
    assert not run_many(limiter, 4)[-1].ok
    asked = store.groups
    limiter.reload(gateway_limits(IP_3_PER_10S))
    assert not decide(limiter).ok
    assert store.groups == asked  # refused from the cache: the rule is the same


# --- leases -------------------------------------------------------------------------------


def test_leased_units_answer_requests_without_the_store_and_never_past_the_limit() -> None:
    clock, store = FakeClock(T0), CountingStore()
    limiter = Limiter(gateway_limits([{"by": "ip", "requests": 1_000, "window": "10s"}]), store, clock, lease=10)
    verdicts = run_many(limiter, 1_100)
    assert [v.ok for v in verdicts] == [True] * 1_000 + [False] * 100
    assert store.groups < 200  # 10 units a round trip while plenty is left, then one by one
    assert limiter.stats["leased"] == 1_100 - store.groups - limiter.stats["over_limit_cache_hits"]
    remaining = [int(v.headers[1][1].split(";r=")[1].split(";")[0]) for v in verdicts[:1_000]]
    assert remaining == list(range(999, -1, -1))  # one replica alone: exact, leased or not


def test_leases_end_with_their_window_and_when_their_rule_changes() -> None:
    clock, store = FakeClock(T0), CountingStore()
    rules = [{"by": "ip", "requests": 1_000, "window": "10s"}]
    limiter = Limiter(gateway_limits(rules), store, clock, lease=10)
    run_many(limiter, 2)  # the first asks, leases 10; the second uses one
    assert store.groups == 1
    clock.now = T0 + 10  # next window: the units left were for the last one
    run_many(limiter, 1)
    assert store.groups == 2
    limiter.reload(gateway_limits(rules))  # the same rule: its lease stays
    run_many(limiter, 1)
    assert store.groups == 2
    limiter.reload(gateway_limits([{**rules[0], "requests": 2_000}]))  # a changed rule: dropped
    run_many(limiter, 1)
    assert store.groups == 3


def test_gcra_and_small_limits_are_never_leased() -> None:
    store = CountingStore()
    rules = [
        {"by": "ip", "requests": 99, "window": "10s"},
        {"by": "ip", "requests": 1_000, "window": "10s", "algorithm": "gcra"},
    ]
    limiter = Limiter(gateway_limits(rules), store, FakeClock(T0), lease=10)
    run_many(limiter, 20)
    assert store.groups == 20


# --- when the store cannot answer ---------------------------------------------------------


def test_on_store_error_allow_admits_without_headers() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S, on_store_error="allow"), DownStore(), FakeClock(T0))
    verdicts = run_many(limiter, 10)
    assert all(v.ok and v.headers == () for v in verdicts)
    assert limiter.stats["on_store_error.allow"] == 10
    assert limiter.degraded


def test_on_store_error_deny_refuses_with_retry_after_one_second() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S, on_store_error="deny"), DownStore(), FakeClock(T0))
    verdict = decide(limiter)
    assert not verdict.ok
    assert ("retry-after", "1") in verdict.headers


def test_on_store_error_deny_says_the_store_failed_not_that_the_client_is_over() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S, on_store_error="deny"), DownStore(), FakeClock(T0))
    verdict = decide(limiter)
    assert verdict.reason == "rate_limit_store_unavailable"
    body = json.loads(verdict.body)
    assert body["error"] == "rate_limit_store_unavailable"
    assert body["retry_after"] == 1
    # No RateLimit field: the counter was never read, so "r=0" would be a lie.
    assert not any(name.startswith("ratelimit") for name, _ in verdict.headers)
    assert limiter.stats["rate_limit_store_unavailable"] == 1
    assert limiter.stats["over_limit"] == 0


def test_a_real_over_limit_keeps_its_reason() -> None:
    limiter = Limiter(gateway_limits(IP_3_PER_10S), MemoryStore(), FakeClock(T0))
    *_, verdict = run_many(limiter, 4)
    assert verdict.reason == "over_limit"
    assert json.loads(verdict.body)["error"] == "rate_limited"


def test_on_store_error_local_is_a_token_bucket_of_limit_per_replica() -> None:
    made = gateway_limits([{"by": "ip", "requests": 10, "window": "10s"}], on_store_error="local")
    clock = FakeClock(T0)
    limiter = Limiter(made, DownStore(), clock, expected_replicas=2)
    assert [v.ok for v in run_many(limiter, 7)] == [True] * 5 + [False] * 2
    clock.now += 2  # a token bucket: 5 per 10 s refills one every 2 s
    assert [v.ok for v in run_many(limiter, 2)] == [True, False]


def test_rule_policy_overrides_the_default() -> None:
    rules = [
        {"by": "ip", "requests": 100, "window": "10s", "on_store_error": "deny"},
        {"by": "ip", "requests": 100, "window": "1m"},
    ]
    limiter = Limiter(gateway_limits(rules, on_store_error="allow"), DownStore(), FakeClock(T0))
    assert not decide(limiter).ok
