"""What Envoy does with one route of a compiled route table, read the way Envoy reads it.

The compiler says what most routes share once, on the virtual host, and a route says only where
it differs. So a test asks what is *in force* on a route: its own per-filter config, else the
virtual host's; its own rate-limit descriptors, else the virtual host's; its own retry policy,
else the virtual host's. A big table is grouped by path prefix (the virtual host's ``matcher``):
``walked`` is the list Envoy checks for a path, ``routes`` every route once. Envoy's names are
spelled out here, as in the compiler tests.
"""

from __future__ import annotations

import re
from typing import Any

T = "type.googleapis.com/"
AUTHZ = "envoy.filters.http.ext_authz"
RATELIMIT = "envoy.filters.http.ratelimit"
EXTPROC = "envoy.filters.http.ext_proc"
# A filter left out of the request's filter chain on a virtual host or route.
FILTER_OFF = {"@type": T + "envoy.config.route.v3.FilterConfig", "disabled": True}


def table(bootstrap: dict[str, Any], listener: int = 0) -> dict[str, Any]:
    """The route table of a static bootstrap's listener."""
    hcm = bootstrap["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]["typed_config"]
    found: dict[str, Any] = hcm["route_config"]
    return found


def vhost(bootstrap: dict[str, Any], listener: int = 0) -> dict[str, Any]:
    (host,) = table(bootstrap, listener)["virtual_hosts"]
    found: dict[str, Any] = host
    return found


def in_force(host: dict[str, Any], route: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The per-filter config Envoy uses for filter ``name`` on ``route``: the route's, else the
    virtual host's, else None (the listener's filter as configured)."""
    found: dict[str, Any] | None = route.get("typed_per_filter_config", {}).get(name)
    if found is None:
        found = host.get("typed_per_filter_config", {}).get(name)
    return found


def calls(host: dict[str, Any], route: dict[str, Any], name: str) -> bool:
    """Whether filter ``name`` runs on ``route`` (authz and ext_proc: whether it calls out)."""
    config = in_force(host, route, name)
    return not (config or {}).get("disabled", False)


def rate_limits(host: dict[str, Any], route: dict[str, Any]) -> list[dict[str, Any]]:
    """The descriptors Envoy's rate-limit filter builds on ``route`` ([]: no call): none where the
    filter is off or the route has no upstream, the route's own and then the virtual host's
    where the route's filter config says ``vh_rate_limits: INCLUDE``, else the route's own if it
    has some, else the virtual host's (Envoy's default, ``OVERRIDE``)."""
    if not calls(host, route, RATELIMIT) or "route" not in route:
        return []
    own: list[dict[str, Any]] = route["route"].get("rate_limits", [])
    if (in_force(host, route, RATELIMIT) or {}).get("vh_rate_limits") == "INCLUDE":
        return [*own, *host.get("rate_limits", [])]
    return own or list(host.get("rate_limits", []))


def retry_policy(host: dict[str, Any], route: dict[str, Any]) -> dict[str, Any] | None:
    """The retry policy in force on ``route`` (None: no retries); a route's replaces the host's."""
    policy: dict[str, Any] | None = route["route"].get("retry_policy", host.get("retry_policy"))
    if policy is None or policy.get("num_retries") == 0:
        return None
    return policy


# --- which route Envoy picks -------------------------------------------------------------


def _header_matches(matcher: dict[str, Any], headers: dict[str, str]) -> bool:
    value = headers.get(matcher["name"])
    if value is None and matcher.get("treat_missing_header_as_empty"):
        value = ""
    if "present_match" in matcher:
        result = (value is not None) == bool(matcher["present_match"])
    elif value is None:
        return False  # a missing header matches nothing, inverted or not
    else:
        result = _string_matches(matcher["string_match"], value)
    return result != bool(matcher.get("invert_match", False))


def _string_matches(matcher: dict[str, Any], value: str) -> bool:
    if "exact" in matcher:
        return bool(value == matcher["exact"])
    return re.fullmatch(matcher["safe_regex"]["regex"], value) is not None  # RE2 matches the whole value


def _path_matches(match: dict[str, Any], path: str) -> bool:
    if "prefix" in match:
        return path.startswith(match["prefix"])
    if "path_separated_prefix" in match:
        prefix = match["path_separated_prefix"]
        return path == prefix or path.startswith(prefix + "/")
    return re.fullmatch(match["safe_regex"]["regex"], path) is not None


def routes(host: dict[str, Any]) -> list[dict[str, Any]]:
    """Every route of ``host`` once: its ``routes``, or those of its matcher's route lists (in
    the order of their keys, each list in its own order)."""
    if "routes" in host:
        return list(host["routes"])
    seen: dict[int, dict[str, Any]] = {}
    for found in _route_lists(host["matcher"]):
        for route in found:
            seen.setdefault(id(route), route)
    return list(seen.values())


def _route_lists(tree: dict[str, Any]) -> list[list[dict[str, Any]]]:
    lists = [on_match["action"]["typed_config"]["routes"] for on_match in _prefix_map(tree).values()]
    if "on_no_match" in tree:
        lists.append(tree["on_no_match"]["action"]["typed_config"]["routes"])
    return lists


def _prefix_map(tree: dict[str, Any]) -> dict[str, Any]:
    assert tree["matcher_tree"]["input"]["typed_config"]["header_name"] == ":path"
    found: dict[str, Any] = tree["matcher_tree"]["prefix_match_map"]["map"]
    return found


def walked(host: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The routes Envoy checks, in order, for a request on ``path``: the virtual host's
    ``routes``, or the route list of the longest key of its matcher's prefix map that starts
    the path (``on_no_match``'s when none does; [] without one)."""
    if "routes" in host:
        return list(host["routes"])
    tree = host["matcher"]
    keys = [key for key in _prefix_map(tree) if path.startswith(key)]
    if keys:
        on_match = _prefix_map(tree)[max(keys, key=len)]
    elif "on_no_match" in tree:
        on_match = tree["on_no_match"]
    else:
        return []
    assert on_match["action"]["typed_config"]["@type"] == T + "envoy.config.route.v3.RouteList"
    return list(on_match["action"]["typed_config"]["routes"])


def pick(
    host: dict[str, Any], path: str, headers: dict[str, str] | None = None, query: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """The first route of ``host`` that matches a request, as Envoy's route table picks it
    (the route list its path selects, then path prefixes, header and query matchers;
    lower-case header names)."""
    headers = headers or {}
    query = query or {}
    for route in walked(host, path):
        match = route["match"]
        if not _path_matches(match, path):
            continue
        if not all(_header_matches(m, headers) for m in match.get("headers", [])):
            continue
        wanted = match.get("query_parameters", [])
        if all(
            (m["name"] in query)
            if m.get("present_match")
            else (m["name"] in query and _string_matches(m["string_match"], query[m["name"]]))
            for m in wanted
        ):
            found: dict[str, Any] = route
            return found
    return None
