"""``Gateway.api_at``: the API a request's path and method pick when the caller names none
(Istio's ext_authz provider). It looks up only the path's own segment prefixes; it must pick
what a scan of every API in the route table's order picks."""

from __future__ import annotations

import random

import pytest
import yaml

from sidegate import config

pytestmark = pytest.mark.unit

PREFIXES = ["/", "/a", "/a/", "/a/b", "/ab", "/a/b/c", "/b/", "/b", "/v1/a", "/v1/"]


def _gateway() -> config.Gateway:
    apis = []
    for i, prefix in enumerate(PREFIXES):
        for methods in ([], ["GET"]):
            match = {"prefix": prefix, **({"methods": methods} if methods else {})}
            name = f"api{i}{'m' if methods else ''}"
            apis.append({"name": name, "match": match, "service": "echo", "auth": {"anonymous": True}})
    doc = {"listeners": [{"name": "http", "port": 8080}], "services": {"echo": {"endpoints": ["127.0.0.1:9"]}}}
    return config.parse(yaml.safe_dump({**doc, "apis": apis}))


def _scanned(gateway: config.Gateway, path: str, method: str) -> config.Api | None:
    """Every API, longest prefix first (methods before none), on segment boundaries."""
    path = path.partition("?")[0]
    for api in sorted(gateway.apis, key=lambda a: (-len(a.match.prefix.rstrip("/")), not a.match.methods)):
        prefix = api.match.prefix
        fits = path.startswith(prefix if prefix.endswith("/") else prefix + "/") or path == prefix
        if fits and (not api.match.methods or method in api.match.methods):
            return api
    return None


def test_the_lookup_picks_what_a_scan_of_every_api_picks() -> None:
    gateway = _gateway()
    rng = random.Random(7)
    segments = ["a", "b", "c", "ab", "v1", ""]
    for _ in range(3000):
        path = "/" + "/".join(rng.choice(segments) for _ in range(rng.randint(0, 4))) + rng.choice(["", "/", "?q=/a"])
        for method in ("GET", "POST"):
            assert gateway.api_at(path, method) == _scanned(gateway, path, method), (path, method)


def test_examples() -> None:
    gateway = _gateway()
    assert (found := gateway.api_at("/a/b/x", "GET")) is not None
    assert found.name == "api3m"  # /a/b, with methods, before /a/b without
    assert (found := gateway.api_at("/abc", "POST")) is not None
    assert found.name == "api0"  # /ab is no segment of /abc: the root's
