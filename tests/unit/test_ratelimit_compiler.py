"""gateway.yaml's rate-limit sections and what the compiler makes of them for Envoy.

Envoy names are spelled out here rather than read from ``sidegate.compiler``, so a renamed
descriptor key or metadata namespace fails a test instead of changing with the code.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from authz import limits as authz_limits
from authz.decision import Decision, Identity
from ratelimit.limiter import Verdict
from sidegate import compiler, config, contract
from tests.unit.envoy_routes import calls, in_force, rate_limits, vhost
from tests.unit.envoy_routes import routes as all_routes

ROOT = Path(__file__).resolve().parents[2]
RATELIMIT = "envoy.filters.http.ratelimit"
METHOD = {"request_headers": {"header_name": ":method", "descriptor_key": "method"}}


def metadata(key: str, default: str) -> dict[str, Any]:
    return {
        "metadata": {
            "descriptor_key": key,
            "metadata_key": {"key": "envoy.filters.http.ext_authz", "path": [{"key": key}]},
            "default_value": default,
            "source": "DYNAMIC",
        }
    }


def api_key(name: str) -> dict[str, Any]:
    return {"generic_key": {"descriptor_key": "api", "descriptor_value": name}}


def gateway(apis: list[dict[str, Any]], **sections: Any) -> config.Gateway:
    doc = {
        "listeners": [{"name": "http", "port": 8080}],
        "services": {"echo": {"endpoints": ["127.0.0.1:9080"]}},
        "apis": apis,
        **sections,
    }
    return config.parse(yaml.safe_dump(doc, sort_keys=False))


def api(name: str, *rules: dict[str, Any], anonymous: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "match": {"prefix": f"/{name}"}, "service": "echo"}
    if rules:
        out["limits"] = list(rules)
    if anonymous:
        out["auth"] = {"anonymous": True}
    return out


def routes(gw: config.Gateway) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in all_routes(vhost(compiler.compile_bootstrap(gw)))}


def descriptors(gw: config.Gateway) -> dict[str, list[dict[str, Any]]]:
    """Each route's rate-limit descriptors as Envoy builds them ([]: no call)."""
    host = vhost(compiler.compile_bootstrap(gw))
    found = {r["name"]: rate_limits(host, r) for r in all_routes(host)}
    for name in [n for n in found if n.endswith(":key_in_query")]:  # an anonymous route's twin
        assert found.pop(name) == found[name.removesuffix(":key_in_query")], name
    return found


PLANS = {"gold": {"limits": [{"requests": 100, "window": "1s"}]}}


# --- the model ----------------------------------------------------------------------------


def test_rate_limit_defaults() -> None:
    gw = gateway([api("orders")])
    assert gw.plans == {}
    rl = gw.ratelimit
    assert (rl.on_store_error, rl.redis_timeout, rl.expected_replicas, rl.headers) == ("allow", 0.05, 1, "ietf")
    assert (rl.shadow_mode, rl.default_plan, rl.reference_configs) == (False, None, ())
    assert gw.apis[0].limits == ()


def test_limits_parse_with_any_window_and_are_frozen() -> None:
    gw = gateway(
        [api("orders", {"by": "consumer", "requests": 7, "window": "30s", "methods": ["POST"], "algorithm": "gcra"})],
        plans=PLANS,
    )
    (limit,) = gw.apis[0].limits
    assert (limit.by, limit.requests, limit.window, limit.algorithm, limit.methods) == (
        "consumer",
        7,
        30.0,
        "gcra",
        ("POST",),
    )
    assert limit.on_store_error is None  # the ratelimit section's default applies
    with pytest.raises(ValidationError, match="frozen"):
        limit.requests = 8  # type: ignore[misc]
    assert gw.plans["gold"].limits[0].requests == 100


def test_the_example_limits_public_per_ip_and_has_plans() -> None:
    gw = config.load(ROOT / "examples" / "gateway.yaml")
    public = gw.api("public")
    assert public is not None
    assert [(limit.by, limit.requests, limit.window) for limit in public.limits] == [("ip", 20, 1.0)]
    assert set(gw.plans) >= {"gold"}
    assert [(r.requests, r.window) for r in gw.plans["gold"].limits] == [(100, 1.0), (1_000_000, 86_400.0)]


# --- the route actions --------------------------------------------------------------------


def test_routes_without_limits_keep_the_ratelimit_filter_off() -> None:
    found = descriptors(gateway([api("orders"), api("public", anonymous=True)]))
    assert found == {"orders": [], "public": [], "not_found": []}


def test_a_per_ip_limit_turns_the_filter_on_with_a_remote_address_descriptor() -> None:
    found = descriptors(gateway([api("public", {"by": "ip", "requests": 20, "window": "1s"}, anonymous=True)]))
    assert found["public"] == [{"actions": [api_key("public"), {"remote_address": {}}, METHOD]}]
    assert found["not_found"] == []


def test_one_descriptor_per_kind_of_count() -> None:
    rules = [
        {"by": "global", "requests": 1000, "window": "1s"},
        {"by": "consumer", "requests": 10, "window": "1s"},
        {"by": "consumer", "requests": 1000, "window": "1d"},
        {"by": "ip", "requests": 50, "window": "1s"},
    ]
    (orders,) = [r for name, r in routes(gateway([api("orders", *rules)])).items() if name == "orders"]
    assert orders["route"]["rate_limits"] == [
        {"actions": [api_key("orders"), metadata("consumer", "unknown"), METHOD]},
        {"actions": [api_key("orders"), {"remote_address": {}}, METHOD]},
        {"actions": [api_key("orders"), METHOD]},
    ]


def test_plans_add_a_plan_descriptor_on_routes_with_credentials_only() -> None:
    limited = api("limited", {"by": "consumer", "requests": 5, "window": "1s"})
    gw = gateway([api("orders"), api("public", anonymous=True), limited], plans=PLANS)
    found = descriptors(gw)
    plan = {"actions": [metadata("plan", "none"), metadata("consumer", "unknown"), METHOD]}
    assert found["orders"] == [plan]
    # A route with limits of its own lists the plan's descriptor too: Envoy takes the route's
    # descriptors instead of the virtual host's.
    assert found["limited"] == [{"actions": [api_key("limited"), metadata("consumer", "unknown"), METHOD]}, plan]
    # An anonymous route has no authz, so no metadata: no plan descriptor and no callout.
    assert found["public"] == []
    assert found["not_found"] == []  # Envoy answers it: no upstream, no rate limit
    # Said once: the plan descriptor is the virtual host's, and the routes that take it say nothing.
    host = vhost(compiler.compile_bootstrap(gw))
    assert host["rate_limits"] == [plan]
    assert "rate_limits" not in routes(gw)["orders"]["route"]


def test_every_metadata_action_has_a_default_so_missing_metadata_never_bypasses() -> None:
    gw = gateway(
        [
            api("orders", {"by": "consumer", "requests": 1, "window": "1s"}),
            api("public", {"by": "ip", "requests": 1, "window": "1s"}, anonymous=True),
        ],
        plans=PLANS,
    )
    actions = [action for found in descriptors(gw).values() for limit in found for action in limit["actions"]]
    found = [action["metadata"] for action in actions if "metadata" in action]
    assert len(found) == 3
    assert all(meta["default_value"] for meta in found)


def test_in_authz_turns_the_ratelimit_filter_off_and_authz_on_where_limits_apply() -> None:
    limited = {"by": "ip", "requests": 5, "window": "1s"}
    gw = gateway(
        [api("public", limited, anonymous=True), api("open", anonymous=True), api("orders")],
        plans=PLANS,
        ratelimit={"in_authz": True},
    )
    host = vhost(compiler.compile_bootstrap(gw))
    compiled = {r["name"]: r for r in all_routes(host)}
    for name in ("public", "open", "orders"):
        assert rate_limits(host, compiled[name]) == []
    authz = {n: in_force(host, compiled[n], "envoy.filters.http.ext_authz") or {} for n in compiled}
    assert authz["public"]["check_settings"]["context_extensions"] == {"api": "public", "limits": "1"}
    assert not calls(host, compiled["open"], "envoy.filters.http.ext_authz")  # anonymous, nothing to count
    assert authz["orders"]["check_settings"]["context_extensions"] == {"api": "orders", "limits": "1"}
    # the descriptors authz builds are the ones Envoy would have sent
    assert contract.rate_limit_shapes(gw.apis[0], gw) == [("api", "remote_address", "method")]
    assert contract.rate_limit_shapes(gw.apis[2], gw) == [("plan", "consumer", "method")]


def test_authz_builds_the_descriptors_of_the_config_in_force_after_a_reload() -> None:
    who = Identity("api_key", "ada", plan="gold")
    before = gateway([api("orders", {"by": "consumer", "requests": 5, "window": "1s"})], ratelimit={"in_authz": True})
    wanted = authz_limits.request(before.apis[0], before, who, "GET", "10.0.0.1")
    assert wanted is not None
    assert [d.entries for d in wanted.descriptors] == [(("api", "orders"), ("consumer", "ada"), ("method", "GET"))]
    # Reloaded: per-IP now, and plans exist. The API is a new object; nothing of the old shapes stays.
    after = gateway([api("orders", {"by": "ip", "requests": 5, "window": "1s"})], plans=PLANS)
    wanted = authz_limits.request(after.apis[0], after, who, "GET", "10.0.0.1")
    assert wanted is not None
    assert [d.entries for d in wanted.descriptors] == [
        (("api", "orders"), ("remote_address", "10.0.0.1"), ("method", "GET")),
        (("plan", "gold"), ("consumer", "ada"), ("method", "GET")),
    ]
    unlimited = gateway([api("orders")])
    assert authz_limits.request(unlimited.apis[0], unlimited, who, "GET", "10.0.0.1") is None


def test_authz_limits_keep_every_field_of_an_allowed_decision() -> None:
    allowed = Decision(True, code="c", headers=(("x-consumer-id", "a"),), remove=("r",), metadata={"m": "1"})
    allowed = Decision(**{**{f.name: getattr(allowed, f.name) for f in fields(Decision)}, "shadow_status": 401})
    out = authz_limits.apply(allowed, Verdict(True, (), (("ratelimit", "r=1"),)))
    for f in fields(Decision):
        if f.name != "response_headers":
            assert getattr(out, f.name) == getattr(allowed, f.name), f.name  # a new field is never dropped
    assert out.response_headers == (("ratelimit", "r=1"),)
