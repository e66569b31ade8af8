"""Which rules a request's descriptors hit: gateway.yaml limits and reference-format trees."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from ratelimit import limits, reference
from ratelimit.limits import Descriptor, Limits, Request, Rule
from sidegate import config

LISTENERS = [{"name": "http", "port": 8080}]
SERVICES = {"echo": {"endpoints": ["127.0.0.1:9080"]}}


def gateway(apis: list[dict[str, Any]], **sections: Any) -> config.Gateway:
    doc = {"listeners": LISTENERS, "services": SERVICES, "apis": apis, **sections}
    return config.parse(yaml.safe_dump(doc, sort_keys=False))


def api(name: str, *rules: dict[str, Any], anonymous: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "match": {"prefix": f"/{name}"}, "service": "echo", "limits": list(rules)}
    if anonymous:
        out["auth"] = {"anonymous": True}
    return out


def request(*descriptors: tuple[tuple[str, str], ...], domain: str = "sidegate", hits: int = 0) -> Request:
    return Request(domain, tuple(Descriptor(entries) for entries in descriptors), hits)


def hit_ids(found: limits.Match) -> list[tuple[int, str]]:
    return [(hit.index, hit.rule.id) for hit in found.hits]


# --- gateway.yaml limits ------------------------------------------------------------------

GW = gateway(
    [
        api(
            "orders",
            {"by": "consumer", "requests": 100, "window": "1m"},
            {"by": "consumer", "requests": 5, "window": "1s", "methods": ["POST"], "algorithm": "gcra"},
            {"by": "ip", "requests": 50, "window": "1s"},
            {"by": "global", "requests": 1000, "window": "1s", "name": "orders-total"},
        ),
        api("public", {"by": "ip", "requests": 20, "window": "1s", "algorithm": "sliding_window"}, anonymous=True),
    ],
    plans={
        "gold": {"limits": [{"requests": 100, "window": "1s"}, {"requests": 1_000_000, "window": "1d"}]},
        "free": {"limits": [{"requests": 5, "window": "1s", "shadow_mode": True}]},
    },
    ratelimit={"default_plan": "free", "on_store_error": "deny"},
)
LIMITS = limits.from_gateway(GW)


def test_rules_from_gateway_carry_window_algorithm_policy_and_store_error_policy() -> None:
    by_kind = LIMITS.api_rules["orders"]
    assert [r.policy for r in by_kind["consumer"]] == ["orders-consumer-1m", "orders-consumer-1s"]
    assert by_kind["consumer"][1] == Rule(
        id="a.orders.1",
        policy="orders-consumer-1s",
        limit=5,
        window_ms=1_000,
        algorithm="gcra",
        on_store_error="deny",
        methods=frozenset({"POST"}),
    )
    assert by_kind["global"][0].policy == "orders-total"
    assert by_kind["global"][0].id == "a.orders.orders-total"
    assert [(r.policy, r.window_ms) for r in LIMITS.plan_rules["gold"]] == [("gold-1s", 1_000), ("gold-1d", 86_400_000)]
    assert LIMITS.plan_rules["free"][0].shadow is True


def test_a_descriptor_per_kind_of_count_hits_that_kinds_rules_for_its_method() -> None:
    get = request(
        (("api", "orders"), ("consumer", "alice"), ("method", "GET")),
        (("api", "orders"), ("remote_address", "10.0.0.1"), ("method", "GET")),
        (("api", "orders"), ("method", "GET")),
    )
    assert hit_ids(LIMITS.match(get)) == [(0, "a.orders.0"), (1, "a.orders.2"), (2, "a.orders.orders-total")]
    post = request((("api", "orders"), ("consumer", "alice"), ("method", "POST")))
    assert hit_ids(LIMITS.match(post)) == [(0, "a.orders.0"), (0, "a.orders.1")]


def test_a_consumers_plan_and_api_counters_share_one_hash_tag() -> None:
    found = LIMITS.match(
        request(
            (("api", "orders"), ("consumer", "alice"), ("method", "GET")),
            (("plan", "gold"), ("consumer", "alice"), ("method", "GET")),
        )
    )
    assert {hit.tag for hit in found.hits} == {"c:alice"}
    assert [hit.key for hit in found.hits] == [
        "sg:rl:{c:alice}:a.orders.0:f60000",
        "sg:rl:{c:alice}:p.gold.0:f1000",
        "sg:rl:{c:alice}:p.gold.1:f86400000",
    ]
    ip = LIMITS.match(request((("api", "public"), ("remote_address", "::1"), ("method", "GET"))))
    assert [hit.key for hit in ip.hits] == ["sg:rl:{ip:::1}:a.public.0:s1000"]


@pytest.mark.parametrize("plan", ["none", "platinum"])
def test_no_plan_or_an_unknown_plan_gets_the_default_plan(plan: str) -> None:
    found = LIMITS.match(request((("plan", plan), ("consumer", "bob"), ("method", "GET"))))
    assert hit_ids(found) == [(0, "p.free.0")]


def test_without_a_default_plan_a_key_without_plan_has_no_plan_limits() -> None:
    bare = limits.from_gateway(gateway([api("orders")], plans={"gold": {"limits": [{"requests": 1, "window": "1s"}]}}))
    assert bare.match(request((("plan", "none"), ("consumer", "bob"), ("method", "GET")))).hits == ()


def test_descriptors_for_other_apis_or_shapes_hit_nothing() -> None:
    assert LIMITS.match(request((("api", "nope"), ("method", "GET")))).hits == ()
    assert LIMITS.match(request((("what", "ever"),))).hits == ()
    assert LIMITS.match(request((("api", "orders"),), domain="other")).hits == ()


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("alice", "alice"),
        ("a{b}c", "a%7Bb%7Dc"),
        ("with space", "with%20space"),
        ("k=v|x", "k%3Dv%7Cx"),
        ("ünï", "%C3%BCn%C3%AF"),
    ],
)
def test_values_are_escaped_so_they_cannot_break_a_hash_tag(value: str, escaped: str) -> None:
    found = LIMITS.match(request((("api", "orders"), ("consumer", value), ("method", "GET"))))
    assert found.hits[0].tag == f"c:{escaped}"
    assert found.hits[0].key.count("{") == 1
    assert found.hits[0].key.count("}") == 1


def test_a_huge_value_is_hashed_into_a_short_tag() -> None:
    found = LIMITS.match(request((("api", "orders"), ("consumer", "x" * 10_000), ("method", "GET"))))
    tag = found.hits[0].tag
    assert tag.startswith("h:")
    assert len(tag) == 34


def test_hits_addend_of_the_request_and_of_a_descriptor() -> None:
    entries = (("api", "orders"), ("consumer", "a"), ("method", "GET"))
    assert [h.cost for h in LIMITS.match(request(entries)).hits] == [1]
    assert [h.cost for h in LIMITS.match(request(entries, hits=7)).hits] == [7]
    own = Request("sidegate", (Descriptor(entries, hits_addend=3),), hits_addend=7)
    assert [h.cost for h in LIMITS.match(own).hits] == [3]
    huge = Request("sidegate", (Descriptor(entries, hits_addend=2**60),))
    assert [h.cost for h in LIMITS.match(huge).hits] == [limits.MAX_COST]


def test_window_text() -> None:
    assert [limits.window_text(ms) for ms in (1_000, 30_000, 60_000, 7_200_000, 86_400_000, 1_500)] == [
        "1s",
        "30s",
        "1m",
        "2h",
        "1d",
        "1500ms",
    ]


def test_global_shadow_mode_makes_every_rule_shadow() -> None:
    shadowed = limits.from_gateway(
        gateway([api("orders", {"by": "ip", "requests": 1, "window": "1s"})], ratelimit={"shadow_mode": True})
    )
    assert all(rule.shadow for rule in shadowed.rules())


# --- reference-format trees ---------------------------------------------------------------

REFERENCE = """
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: remote_address
    value: 50.0.0.5
    rate_limit: {unit: second, requests_per_unit: 0}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: path
    value: /api/admin/*
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: path
    rate_limit: {unit: hour, requests_per_unit: 1000}
  - key: tenant
    value: acme
    descriptors:
      - key: user
        detailed_metric: true
        rate_limit: {unit: day, requests_per_unit: 50, name: acme_users}
      - key: user
        value: vip
        rate_limit:
          unit: day
          requests_per_unit: 500
          replaces: [{name: acme_users}]
  - key: user
    rate_limit: {unit: day, requests_per_unit: 20}
  - key: internal
    rate_limit: {unlimited: true}
  - key: soft
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 1}
"""


@pytest.fixture(scope="module")
def edge() -> Limits:
    domain, root = reference.parse(REFERENCE, "edge.yaml")
    return Limits(domains={domain: root})


def ids(found: limits.Match) -> list[str]:
    return [hit.rule.id for hit in found.hits]


def test_key_value_is_more_specific_than_key(edge: Limits) -> None:
    assert ids(edge.match(request((("remote_address", "50.0.0.1"),), domain="edge"))) == ["edge.remote_address"]
    blocked = edge.match(request((("remote_address", "50.0.0.5"),), domain="edge"))
    assert ids(blocked) == ["edge.remote_address_50.0.0.5"]
    assert blocked.hits[0].rule.limit == 0


def test_the_first_wildcard_in_file_order_wins_and_exact_beats_wildcard(edge: Limits) -> None:
    """As the reference's config_impl.go: wildcards are tried in the order the file lists them,
    so /api/* (listed first) shadows the longer /api/admin/*."""

    def path(value: str) -> list[str]:
        return ids(edge.match(request((("path", value),), domain="edge")))

    assert path("/api/orders") == ["edge.path_/api/*"]
    assert path("/api/admin/users") == ["edge.path_/api/*"]
    assert path("/web") == ["edge.path"]


def test_a_rule_applies_only_at_the_depth_of_the_last_entry(edge: Limits) -> None:
    # (tenant, acme) has no rule of its own, and (remote_address) has no children.
    assert edge.match(request((("tenant", "acme"),), domain="edge")).hits == ()
    deeper = (("remote_address", "1.2.3.4"), ("user", "x"))
    assert edge.match(request(deeper, domain="edge")).hits == ()
    nested = edge.match(request((("tenant", "acme"), ("user", "joe")), domain="edge"))
    assert ids(nested) == ["edge.tenant_acme.user"]


def test_replaces_drops_the_named_limit_where_both_match(edge: Limits) -> None:
    both = edge.match(
        request((("tenant", "acme"), ("user", "joe")), (("tenant", "acme"), ("user", "vip")), domain="edge")
    )
    assert ids(both) == ["edge.tenant_acme.user_vip"]
    alone = edge.match(request((("tenant", "acme"), ("user", "joe")), (("user", "joe"),), domain="edge"))
    assert ids(alone) == ["edge.tenant_acme.user", "edge.user"]


def test_unlimited_is_answered_without_a_counter(edge: Limits) -> None:
    found = edge.match(request((("internal", "x"),), (("user", "u"),), domain="edge"))
    assert found.unlimited == frozenset({0})
    assert ids(found) == ["edge.user"]


def test_detailed_metric_names_the_stat_by_value(edge: Limits) -> None:
    (hit,) = edge.match(request((("tenant", "acme"), ("user", "joe")), domain="edge")).hits
    assert hit.stat == "edge.tenant_acme.user_joe"
    (plain,) = edge.match(request((("user", "joe"),), domain="edge")).hits
    assert plain.stat == "edge.user"


def test_shadow_mode_and_counter_keys_of_reference_rules(edge: Limits) -> None:
    (hit,) = edge.match(request((("soft", "a b"),), domain="edge")).hits
    assert hit.rule.shadow is True
    assert hit.tag == "r:edge:soft=a%20b"
    assert hit.key == "sg:rl:{r:edge:soft=a%20b}:edge.soft:c1000"


def test_envoys_descriptor_limit_override_is_counted_as_the_reference_counts(edge: Limits) -> None:
    override = Request("edge", (Descriptor((("anything", "x"),), override=(42, "minute")),))
    (hit,) = edge.match(override).hits
    assert (hit.rule.limit, hit.rule.window_ms, hit.rule.algorithm) == (42, 60_000, "counted_fixed_window")
    assert (hit.rule.name, hit.rule.reference, hit.rule.shadow) == ("", True, False)


def test_an_override_on_an_unknown_domain_is_not_applied(edge: Limits) -> None:
    """The reference (config_impl.go, GetLimit) answers an unknown domain before it looks at the
    descriptor's override: no limit."""
    override = Request("nobody", (Descriptor((("anything", "x"),), override=(1, "second")),))
    assert edge.match(override).hits == ()


def test_a_repeated_descriptor_is_matched_from_memory_with_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "GATEWAY_HITS_CACHED", 50)
    fresh = limits.from_gateway(GW)
    one = (("api", "orders"), ("consumer", "ada"), ("method", "POST"))
    other = (("api", "orders"), ("consumer", "bob"), ("method", "GET"))
    first = fresh.match(request(one, other))
    again = fresh.match(request(one, other))
    assert again == first
    assert [h.key for h in again.hits] == [h.key for h in first.hits]
    # position and cost are part of what is remembered
    swapped = fresh.match(request(other, one, hits=3))
    assert [(h.index, h.tag, h.cost) for h in swapped.hits] == [(0, "c:bob", 3), (1, "c:ada", 3), (1, "c:ada", 3)]
    # bounded: past the limit it starts again, and answers stay the same
    for n in range(limits.GATEWAY_HITS_CACHED + 10):
        fresh.match(request((("api", "orders"), ("consumer", f"c{n}"), ("method", "GET"))))
    assert fresh.match(request(one, other)) == first
