"""API versions, pure: the declared changes as body transforms, the routes the compiler emits,
and the contradictions ``sidegate check`` refuses."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from extproc.errors import TransformError
from extproc.transforms import chain, chains
from sidegate import compiler, config
from sidegate.compiler import groups
from sidegate.compiler.versions import deprecation_value, sunset_value
from sidegate.errors import ConfigError
from tests.unit import envoy_routes
from tests.unit.envoy_routes import EXTPROC, calls, in_force, pick

BASE = """
listeners: [{name: http, port: 8080}]
services:
  echo: {endpoints: ["127.0.0.1:9080"]}
  legacy: {endpoints: ["127.0.0.1:9081"]}
apis:
  - name: widgets
    match: {prefix: /widgets}
    service: echo
    auth: {anonymous: true}
    versioning: {default: v3, header: api-version, query: version, media_type: acme, path: true}
    versions:
      v1:
        served_by: v3
        deprecated: 2026-01-01
        sunset: 2026-12-31
        changes:
          - rename: {from: name, to: info.title}
          - wrap: {field: sizes, into: values}
      v2:
        served_by: v3
        changes:
          - add: {field: currency, default: EUR}
          - map: {field: status, values: {open: OPEN, closed: CLOSED}}
          - remove: {field: legacy, default: false}
      v3: {prefix: /api/v3/widgets}
"""


def gateway(text: str = BASE) -> config.Gateway:
    return config.parse(text)


def host(text: str = BASE, today: dt.date = dt.date(2026, 11, 29)) -> dict[str, Any]:
    bootstrap = compiler.compile_bootstrap(gateway(text), today=today)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    found: dict[str, Any] = hcm["route_config"]["virtual_hosts"][0]
    return found


def routes(text: str = BASE, today: dt.date = dt.date(2026, 11, 29)) -> list[dict[str, Any]]:
    """The route table, without the twins that guard anonymous routes against keys in the query."""
    return [r for r in envoy_routes.routes(host(text, today)) if not r["name"].endswith(":key_in_query")]


@pytest.fixture
def flat(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table as one ordered list, as a small gateway gets it (no matcher)."""
    monkeypatch.setattr(groups, "GROUP_FROM", 10**6)


@pytest.fixture(params=["flat", "grouped"])
def shape(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test that uses it runs on the flat table and on the one grouped by path prefix."""
    monkeypatch.setattr(groups, "GROUP_FROM", 10**6 if request.param == "flat" else 0)
    monkeypatch.setattr(groups, "GROUP_SIZE", 1)  # as many keys as the literals allow
    return str(request.param)


def by_name(all_routes: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(r for r in all_routes if r["name"] == name)


# -- transforms ---------------------------------------------------------------------------


def test_requests_go_up_through_every_version_and_responses_come_back_down() -> None:
    widgets = gateway().apis[0]
    v1 = chain(widgets, "v1")
    doc = {"name": "bolt", "sizes": [1, 2], "status": "open", "legacy": True}
    up = v1.up(doc)
    assert up == {"info": {"title": "bolt"}, "sizes": {"values": [1, 2]}, "status": "OPEN", "currency": "EUR"}
    assert v1.down(up) == {"name": "bolt", "sizes": [1, 2], "status": "open", "legacy": False}


def test_v2_takes_only_its_own_changes() -> None:
    v2 = chain(gateway().apis[0], "v2")
    assert v2.up({"status": "closed"}) == {"status": "CLOSED", "currency": "EUR"}
    assert v2.down({"status": "CLOSED", "currency": "USD"}) == {"status": "closed", "legacy": False}


def test_arrays_are_transformed_item_by_item_and_unknown_values_pass() -> None:
    v2 = chain(gateway().apis[0], "v2")
    assert v2.down([{"status": "OPEN"}, {"status": "LOST"}]) == [
        {"status": "open", "legacy": False},
        {"status": "LOST", "legacy": False},
    ]


def test_a_path_through_a_non_object_is_an_error() -> None:
    v1 = chain(gateway().apis[0], "v1")
    with pytest.raises(TransformError, match="info"):
        v1.up({"name": "x", "info": "not an object"})


def test_only_versions_served_by_another_get_a_chain() -> None:
    assert sorted(chains(gateway())) == ["widgets:v1", "widgets:v2"]


def test_whole_body_wrap_round_trips() -> None:
    text = BASE.replace("- wrap: {field: sizes, into: values}", "- wrap: {into: data}")
    v1 = chain(gateway(text).apis[0], "v1")
    assert v1.up({"name": "n"})["data"] == {"info": {"title": "n"}}
    # v2's changes apply to the wrapped body: what v2 restores sits beside "data", which v1 drops
    assert v1.down({"data": {"info": {"title": "n"}}, "currency": "EUR"}) == {"name": "n"}


# -- routes -------------------------------------------------------------------------------


def test_header_only_selection_is_native_routing() -> None:
    route = by_name(routes(), "widgets:v2:header")
    assert route["match"]["headers"][0] == {"name": "api-version", "string_match": {"exact": "v2"}}
    assert route["route"]["prefix_rewrite"] == "/api/v3/widgets"
    # The default version asked for by header is the default route: no route of its own.
    default = pick(host(), "/widgets", {"api-version": "v3"})
    assert default is not None
    assert default["name"] == "widgets:v3:default"
    assert default["route"]["prefix_rewrite"] == "/api/v3/widgets"
    assert not calls(host(), default, "envoy.filters.http.ext_proc")
    assert not calls(host(), default, "envoy.filters.http.ext_authz")


def test_transforming_version_turns_ext_proc_on_for_its_routes_only() -> None:
    route = by_name(routes(), "widgets:v1:header")
    extproc = in_force(host(), route, EXTPROC)
    assert extproc is not None
    assert extproc["overrides"] == {
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND"},
        "grpc_initial_metadata": [{"key": "x-sidegate-route", "value": "widgets:v1"}],
    }
    bootstrap = compiler.compile_bootstrap(gateway())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (listener_extproc,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == EXTPROC]
    mode = listener_extproc["processing_mode"]
    # The response's headers only where a route asks: a local reply with no route (the codec's
    # 431) must not wait on ext_proc.
    assert (mode["request_header_mode"], mode["response_header_mode"]) == ("SEND", "SKIP")
    assert mode["request_body_mode"] == "NONE"  # the session asks when needed


def served(text: str, path: str, headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> str:
    """The version a request is served as (the header the upstream gets), or the status Envoy answers."""
    route = pick(host(text), path, headers, query)
    assert route is not None
    if "direct_response" in route:
        return str(route["direct_response"]["status"])
    (added,) = [
        h["header"]["value"] for h in route["request_headers_to_add"] if h["header"]["key"] == "x-sidegate-version"
    ]
    return str(added)


LOCKED = BASE.replace("auth: {anonymous: true}", "auth: {api_key: true}")


@pytest.mark.parametrize(
    ("path", "headers", "query", "version"),
    [
        ("/widgets", {}, {}, "v3"),
        ("/widgets", {"api-version": "v3"}, {}, "v3"),
        ("/widgets", {"api-version": "v1"}, {}, "v1"),
        ("/widgets", {"api-version": "v9"}, {}, "400"),
        ("/widgets/7", {"api-version": "v2"}, {}, "v2"),
        # the first way of asking that names a version wins, the default included
        ("/widgets", {"api-version": "v3", "x-sidegate-version": "v1"}, {}, "v3"),
        ("/widgets", {"api-version": "v3"}, {"version": "v1"}, "v3"),
        ("/widgets", {"x-sidegate-version": "v3"}, {"version": "v1"}, "v1"),
        ("/widgets", {"x-sidegate-version": "v1"}, {"version": "v3"}, "v3"),
        ("/widgets", {"x-sidegate-version": "v1"}, {}, "v1"),
        ("/widgets", {"x-sidegate-version": "v3"}, {}, "v3"),
        # a way of asking that names no version does not stop a later one that does
        ("/widgets", {"api-version": "v9", "x-sidegate-version": "v1"}, {}, "v1"),
        ("/widgets", {"api-version": "v9", "x-sidegate-version": "v3"}, {}, "v3"),
        ("/widgets", {"x-sidegate-version": "v3"}, {"version": "v9"}, "v3"),
        ("/widgets", {"x-sidegate-version": "v9"}, {"version": "v9"}, "400"),
        ("/widgets", {"accept": "application/vnd.acme.v1+json"}, {}, "v1"),
        ("/widgets", {"accept": "application/vnd.acme.v3+json", "x-sidegate-version": "v1"}, {}, "v3"),
        ("/widgets", {"accept": "application/vnd.acme.v9+json"}, {}, "400"),
        ("/v1/widgets", {"api-version": "v3"}, {}, "v1"),
        ("/v3/widgets", {}, {}, "v3"),
        ("/v9/widgets", {}, {}, "400"),
    ],
)
def test_each_way_of_asking_picks_its_version_in_precedence_order(
    shape: str, path: str, headers: dict[str, str], query: dict[str, str], version: str
) -> None:
    assert served(LOCKED, path, headers, query) == version


def test_the_grouped_table_is_a_matcher_and_the_small_one_a_list(shape: str) -> None:
    # What the grid above ran on: a prefix map of route lists, or the one ordered list.
    assert ("matcher" in host(LOCKED)) == (shape == "grouped")
    assert ("routes" in host(LOCKED)) == (shape == "flat")


def test_with_the_path_last_the_default_keeps_its_routes_on_path_forms(shape: str) -> None:
    text = LOCKED.replace("path: true}", "path: true, precedence: [header, query, media_type, pin, path]}")
    assert served(text, "/v1/widgets", {"api-version": "v3"}) == "v3"
    assert served(text, "/v1/widgets", {}) == "v1"
    assert served(text, "/widgets", {"api-version": "v3", "x-sidegate-version": "v1"}) == "v3"
    assert served(text, "/widgets", {"api-version": "v9", "x-sidegate-version": "v3"}) == "v3"


@pytest.mark.usefixtures("flat")
def test_precedence_orders_the_routes() -> None:
    names = [r["name"] for r in routes() if r["name"].startswith("widgets:v1:")]
    assert names[0] == "widgets:v1:path"
    assert names.index("widgets:v1:header") < names.index("widgets:v1:query") < names.index("widgets:v1:media_type")
    reordered = routes(BASE.replace("path: true}", "path: true, precedence: [query, header, path, media_type]}"))
    order = [r["name"] for r in reordered if r["name"].startswith("widgets:v2:")]
    assert order[:2] == ["widgets:v2:query", "widgets:v2:query@/v1/widgets"]


def test_lifecycle_headers_have_rfc_syntax() -> None:
    assert deprecation_value(dt.date(2026, 1, 1)) == "@1767225600"
    assert sunset_value(dt.date(2026, 12, 31)) == "Thu, 31 Dec 2026 00:00:00 GMT"
    added = {
        h["header"]["key"]: h["header"]["value"]
        for h in by_name(routes(), "widgets:v1:header")["response_headers_to_add"]
    }
    assert added == {
        "deprecation": "@1767225600",
        "sunset": "Thu, 31 Dec 2026 00:00:00 GMT",
        "link": '</v2/widgets>; rel="successor-version"',
    }


def test_a_future_sunset_asks_authz_and_a_past_one_is_410_from_envoy() -> None:
    before = by_name(routes(), "widgets:v1:header")
    context = before["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"]
    assert context == {"api": "widgets", "version": "v1", "sunset": "2026-12-31T00:00:00+00:00", "successor": "v2"}
    after = by_name(routes(today=dt.date(2026, 12, 31)), "widgets:v1:header")
    assert after["direct_response"]["status"] == 410


@pytest.mark.usefixtures("flat")
def test_unknown_versions_and_the_default_close_the_api() -> None:
    names = [r["name"] for r in routes() if r["name"].startswith("widgets:")]
    assert names[-1] == "widgets:v3:default"
    assert "widgets:unknown:path" in names
    unknown = by_name(routes(), "widgets:unknown:header@/widgets")
    assert unknown["direct_response"]["status"] == 400
    assert unknown["match"]["headers"][0] == {"name": "api-version", "present_match": True}


def test_anonymous_apis_get_no_pin_routes_and_credentialed_ones_do() -> None:
    assert not [r for r in routes() if r["name"].endswith(":pin")]
    locked = routes(BASE.replace("auth: {anonymous: true}", "auth: {api_key: true}"))
    pin = by_name(locked, "widgets:v2:pin")
    assert pin["match"]["headers"][0] == {"name": "x-sidegate-version", "string_match": {"exact": "v2"}}
    assert not [r for r in locked if r["name"] == "widgets:v3:pin"]  # the default: the default route


def clears_route_cache(text: str) -> bool:
    bootstrap = compiler.compile_bootstrap(gateway(text), today=dt.date(2026, 11, 29))
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    return bool(authz["typed_config"]["clear_route_cache"])


def test_envoy_matches_the_route_again_after_authz_only_where_a_pin_route_exists() -> None:
    # A forged pin header must not pick a pin route: where pin routes exist, authz strips or
    # sets the header and Envoy matches again. Where none exist, matching again is wasted work.
    locked = BASE.replace("auth: {anonymous: true}", "auth: {api_key: true}")
    assert clears_route_cache(locked)
    assert not clears_route_cache(BASE)  # anonymous: no pin routes
    no_pin = locked.replace("path: true}", "path: true, precedence: [path, header, query, media_type]}")
    assert not [r for r in routes(no_pin) if r["name"].endswith(":pin")]
    assert not clears_route_cache(no_pin)
    unversioned = locked.split("    versioning:")[0]
    assert not clears_route_cache(unversioned)


# -- contradictions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("default: v3,", "default: v9,", "apis[0].versioning.default: unknown version 'v9' (known: v1, v2, v3)"),
        (
            "        sunset: 2026-12-31\n",
            "        sunset: 2025-12-31\n",
            "apis[0].versions.v1: sunset 2025-12-31 comes before deprecation 2026-01-01",
        ),
        (
            "      v2:\n        served_by: v3",
            "      v2:\n        served_by: v1",
            "apis[0].versions.v2.served_by: must name a newer version (v3)",
        ),
        (
            "      v2:\n        served_by: v3",
            "      v2:\n        served_by: v7",
            "apis[0].versions.v2.served_by: must name a newer version (v3)",
        ),
        (
            "      v3: {prefix: /api/v3/widgets}",
            "      v3: {prefix: /api/v3/widgets}\n      v4: {prefix: /api/v3/widgets}",
            "apis[0].versions.v4: same upstream as v3 (echo /api/v3/widgets): two versions on one prefix; "
            "serve one through the other with served_by and changes",
        ),
        (
            "      v2:\n        served_by: v3\n",
            "      v2:\n        served_by: v3\n        successor: v1\n",
            "apis[0].versions.v2.successor: must name a newer version (v3)",
        ),
        ("versions:\n      v1:", "versions:\n      v1:\n        service: nope", None),
    ],
)
def test_contradictions_are_config_errors(old: str, new: str, message: str | None) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as info:
        config.parse(BASE.replace(old, new, 1))
    if message is not None:
        assert message in "\n".join(info.value.errors)
