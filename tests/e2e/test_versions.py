"""API versions through real Envoy: each way of asking, precedence, pins, lifecycle headers,
410 after sunset, 400 for unknown versions, and body transforms chained over two versions —
with ext_proc called only on the routes that transform bodies."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import Gateway

EXTPROC_CALLS = "cluster.sidegate_extproc.upstream_rq_total"
REFLECT = {"x-echo-reflect": "1", "content-type": "application/json"}


def upstream(reply: httpx.Response) -> tuple[str, str]:
    """(path, version) the echo upstream saw."""
    assert reply.status_code == 200, reply.text
    seen = reply.json()
    return seen["path"], seen["headers"].get("x-sidegate-version", "")


@pytest.mark.parametrize(
    ("path", "headers", "params", "expected"),
    [
        ("/widgets/7", {}, {}, ("/api/v3/widgets/7", "v3")),  # the default
        ("/widgets/7", {"api-version": "v2"}, {}, ("/api/v3/widgets/7", "v2")),
        ("/widgets/7", {}, {"version": "v1"}, ("/api/v3/widgets/7", "v1")),
        ("/widgets/7", {"accept": "application/vnd.acme.v2+json"}, {}, ("/api/v3/widgets/7", "v2")),
        ("/widgets/7", {"accept": "text/html, application/json; version=1"}, {}, ("/api/v3/widgets/7", "v1")),
        ("/v2/widgets/7", {}, {}, ("/api/v3/widgets/7", "v2")),
        ("/v3/widgets", {}, {}, ("/api/v3/widgets", "v3")),
        # precedence path > header > query > media type
        ("/v1/widgets/7", {"api-version": "v2"}, {}, ("/api/v3/widgets/7", "v1")),
        ("/widgets/7", {"api-version": "v2"}, {"version": "v1"}, ("/api/v3/widgets/7", "v2")),
        ("/widgets/7", {"accept": "application/vnd.acme.v2+json"}, {"version": "v1"}, ("/api/v3/widgets/7", "v1")),
    ],
)
def test_each_way_of_asking_selects_the_version(
    client: httpx.Client, path: str, headers: dict[str, str], params: dict[str, str], expected: tuple[str, str]
) -> None:
    assert upstream(client.get(path, headers=headers, params=params)) == expected


def test_a_forged_version_header_from_the_client_is_not_a_pin(client: httpx.Client) -> None:
    assert upstream(client.get("/widgets/7", headers={"x-sidegate-version": "v1"})) == ("/api/v3/widgets/7", "v3")


def test_deprecated_version_carries_rfc_headers(client: httpx.Client) -> None:
    reply = client.get("/widgets/7", headers={"api-version": "v1"})
    assert reply.headers["deprecation"] == "@1767225600"  # RFC 9745: 2026-01-01T00:00:00Z
    assert reply.headers["sunset"] == "Thu, 31 Dec 2099 00:00:00 GMT"  # RFC 8594 HTTP-date
    assert reply.headers["link"] == (
        '<https://docs.example.com/widgets/v3>; rel="deprecation"; type="text/html", '
        '</v2/widgets>; rel="successor-version"'
    )
    current = client.get("/widgets/7")
    assert "deprecation" not in current.headers
    assert "sunset" not in current.headers


def test_after_sunset_410_names_the_successor(client: httpx.Client) -> None:
    for reply in (client.get("/widgets/7", headers={"api-version": "v0"}), client.get("/v0/widgets/7")):
        assert reply.status_code == 410
        assert reply.headers["content-type"] == "application/json"
        body = reply.json()
        assert body["error"] == "api_version_gone"
        assert body["successor"] == "v1"


@pytest.mark.parametrize(
    ("path", "headers", "params"),
    [
        ("/widgets/7", {"api-version": "v9"}, {}),
        ("/widgets/7", {}, {"version": "nope"}),
        ("/widgets/7", {"accept": "application/vnd.acme.v9+json"}, {}),
        ("/v9/widgets/7", {}, {}),
    ],
)
def test_unknown_version_is_400_listing_the_supported(
    client: httpx.Client, path: str, headers: dict[str, str], params: dict[str, str]
) -> None:
    reply = client.get(path, headers=headers, params=params)
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "unknown_api_version",
        "message": "widgets has no such version",
        "supported": ["v0", "v1", "v2", "v3"],
        "default": "v3",
    }


def test_v1_client_and_v3_upstream_speak_through_two_versions_of_changes(client: httpx.Client) -> None:
    v1 = {"name": "bolt", "sizes": [1, 2], "status": "open", "legacy": True, "id": 7}
    reply = client.post("/widgets", headers={**REFLECT, "api-version": "v1"}, content=json.dumps(v1))
    assert reply.status_code == 200, reply.text
    received = json.loads(reply.headers["x-echo-received"])
    assert received == {"title": "bolt", "sizes": {"values": [1, 2]}, "status": "OPEN", "id": 7, "currency": "EUR"}
    assert reply.headers["x-echo-path"] == "/api/v3/widgets"
    # …and the v3 answer comes back down to v1, the removed field restored with its default
    assert reply.json() == {"name": "bolt", "sizes": [1, 2], "status": "open", "id": 7, "legacy": False}
    # Envoy frames the replaced body itself (chunked on HTTP/1.1): never a stale content-length
    assert reply.headers.get("content-length", str(len(reply.content))) == str(len(reply.content))


def test_v2_client_gets_one_version_of_changes(client: httpx.Client) -> None:
    reply = client.put("/v2/widgets/7", headers=REFLECT, content=json.dumps({"title": "nut", "status": "closed"}))
    assert json.loads(reply.headers["x-echo-received"]) == {"title": "nut", "status": "CLOSED", "currency": "EUR"}
    assert reply.json() == {"title": "nut", "status": "closed", "legacy": False}


def test_malformed_json_is_400_not_500(client: httpx.Client) -> None:
    reply = client.post("/widgets", headers={**REFLECT, "api-version": "v1"}, content=b'{"name": ')
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"] == "invalid_json"


@pytest.mark.parametrize("body", [b'{"name": "\\ud800"}', b'{"\\udfff": 1}'], ids=["value", "key"])
def test_a_lone_surrogate_is_400_not_500(client: httpx.Client, body: bytes) -> None:
    reply = client.post("/widgets", headers={**REFLECT, "api-version": "v1"}, content=body)
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_json"
    assert "surrogate" in reply.json()["message"]


def test_many_transforms_in_a_row_all_succeed(client: httpx.Client) -> None:
    """Envoy ends every ext_proc stream it is done with by a reset, on a few long-lived
    connections: the sidecar's Rapid Reset guard must not take that for an attack (it closed
    the connection every ~100 streams, and the calls in flight failed with 503)."""
    base = str(client.base_url)

    def burst(n: int) -> list[int]:
        with httpx.Client(base_url=base, timeout=10) as own:
            return [
                own.post("/widgets", headers={**REFLECT, "api-version": "v1"}, json={"name": f"w{n}"}).status_code
                for _ in range(25)
            ]

    with ThreadPoolExecutor(16) as pool:  # calls in flight on Envoy's connections to the sidecar
        statuses = Counter(status for batch in pool.map(burst, range(16)) for status in batch)
    assert statuses == Counter({200: 400}), statuses


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = json.dumps({"name": "x" * (1024 * 1024 + 10)})
    reply = client.post("/widgets", headers={**REFLECT, "api-version": "v1"}, content=big)
    assert reply.status_code == 413
    assert reply.json()["error"] == "body_too_large"


def test_only_transforming_routes_call_ext_proc(versions: Gateway, client: httpx.Client) -> None:
    before = versions.stat(EXTPROC_CALLS)
    for _ in range(10):
        client.get("/widgets/7")  # v3: native route
        client.get("/widgets/7", headers={"api-version": "v3"})
        client.get("/v0/widgets/1")  # 410 from Envoy
    assert versions.stat(EXTPROC_CALLS) == before
    client.get("/widgets/7", headers={"api-version": "v2"})
    assert versions.stat(EXTPROC_CALLS) == before + 1
