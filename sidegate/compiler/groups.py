"""Route groups: a big route table as Envoy's matcher tree, so that a request is checked
against a few routes instead of all of them.

Envoy walks a virtual host's ``routes`` in order and checks each route's headers before its
path, so a request to the last route of a long table pays for every route before it. A virtual
host with a ``matcher`` instead looks the request's path up in a prefix map (the longest key
that starts the path wins) and walks only that key's ``RouteList``; a path that no key starts
goes to ``on_no_match``. A list that matches nothing is no route at all (not the next key), so
each list must be complete for the paths it gets.

``matcher`` keeps Envoy's choice exactly what the ordered table gives. Each route has a
``Reach``: a literal prefix of every path it can match. A key's list holds, in the table's
order, every route that can match a path whose longest key is that key: a route belongs to its
home key (the longest key that is a prefix of its literal, or ``on_no_match`` when none is) and
to each longer key that a path it matches can start with. So the routes a request could match
in the flat table are all in the one list Envoy walks, in the same order.

Keys come from the routes' literals, cut by a character trie until each key owns at most
``GROUP_SIZE`` routes: few keys (each list repeats the catch-all route), and few routes per list.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sidegate.compiler.envoy import TYPE
from sidegate.compiler.specs import Reach

# A flat table of up to this many routes stays a plain list: walking it costs Envoy little.
GROUP_FROM = 16
# The routes a key owns at most, before its ancestors and the catch-all.
GROUP_SIZE = 32

PATH_INPUT = {
    "name": "path",
    "typed_config": {"@type": TYPE + "envoy.type.matcher.v3.HttpRequestHeaderMatchInput", "header_name": ":path"},
}


def reach_of(match: dict[str, Any], reach: Reach | None) -> Reach:
    """A route's reach: its own where it has one (a regex match), else its path prefix."""
    if reach is not None:
        return reach
    prefix = match.get("prefix", match.get("path_separated_prefix"))
    if prefix is None:
        raise AssertionError(f"compiler bug: a regex route without its reach: {match}")
    return Reach(prefix)


def keys(literals: Sequence[str], size: int = GROUP_SIZE) -> list[str]:
    """Prefix-map keys for routes with these literals (one per route): each key the longest
    common prefix of the literals it owns, at most ``size`` routes each where a trie can cut."""
    weights = Counter(literals)
    found: list[str] = []

    def split(items: list[str]) -> None:  # sorted, distinct, not empty
        prefix = _common_prefix(items[0], items[-1])
        if len(items) == 1 or sum(weights[i] for i in items) <= size:
            found.append(prefix)
            return
        rest = items
        if items[0] == prefix:  # a literal that is the others' prefix keeps its own key
            found.append(prefix)
            rest = items[1:]
        for _, sub in itertools.groupby(rest, key=lambda item: item[len(prefix)]):
            split(list(sub))

    split(sorted(weights))
    return sorted(key for key in set(found) if key)


def _common_prefix(first: str, last: str) -> str:
    """The characters two strings start with (of sorted strings, the first's and the last's
    is every one's)."""
    end = 0
    while end < min(len(first), len(last)) and first[end] == last[end]:
        end += 1
    return first[:end]


def _reaches(reach: Reach, key: str, covered: set[str]) -> bool:
    """Whether some path ``reach`` matches starts with ``key`` (a key longer than its literal)
    and can get to the route: not where an earlier route of the key's list without header or
    query matchers takes every such path (``covered``: those routes' path-separated prefixes).
    It may say yes where the answer is no (the route is then walked for nothing), never the
    reverse."""
    if reach.segment is None:
        return key.startswith(reach.literal)
    end = key.find("/", 1)
    if end < 0:
        return True
    segment, rest = key[1:end], key[end:]
    if re.fullmatch(reach.segment, segment) is None:
        return False
    if f"/{segment}{reach.rest}" in covered:  # that version's own path route comes first
        return False
    return reach.rest.startswith(rest) or rest.startswith(reach.rest)


def _covers(route: dict[str, Any]) -> str | None:
    """The path-separated prefix of a route that takes every request on it, else None."""
    match = route.get("match", {})
    return match.get("path_separated_prefix") if len(match) == 1 else None


def _home(literal: str, all_keys: set[str]) -> str:
    for end in range(len(literal), 0, -1):
        if literal[:end] in all_keys:
            return literal[:end]
    return ""


def matcher(routes: Sequence[dict[str, Any]], reaches: Sequence[Reach]) -> dict[str, Any]:
    """The virtual host's ``matcher`` for ``routes`` (in the table's order) and their reaches."""
    ordered = keys([r.literal for r in reaches])
    all_keys = set(ordered)
    lists: dict[str, list[dict[str, Any]]] = {key: [] for key in ["", *ordered]}
    covered: dict[str, set[str]] = {key: set() for key in lists}
    for route, reach in zip(routes, reaches, strict=True):
        home = _home(reach.literal, all_keys)
        owners = [home]
        for key in ordered[bisect.bisect_right(ordered, reach.literal) :]:
            if not key.startswith(reach.literal):
                break
            if _reaches(reach, key, covered[key]):
                owners.append(key)
        whole = _covers(route)
        for key in owners:
            lists[key].append(route)
            if whole is not None:
                covered[key].add(whole)
    tree: dict[str, Any] = {
        "matcher_tree": {
            "input": PATH_INPUT,
            "prefix_match_map": {"map": {key: _route_list(lists[key]) for key in ordered}},
        }
    }
    if lists[""]:
        tree["on_no_match"] = _route_list(lists[""])
    return tree


def _route_list(routes: list[dict[str, Any]]) -> dict[str, Any]:
    route_list = {"@type": TYPE + "envoy.config.route.v3.RouteList", "routes": routes}
    return {"action": {"name": "routes", "typed_config": route_list}}
