"""The walking skeleton through real Envoy: routes, TLS, callouts made and not made, spoofing."""

from __future__ import annotations

import ssl
import warnings

import httpx
import pytest

from tests.e2e.conftest import Gateway

AUTHZ_CALLS = "cluster.sidegate_authz.upstream_rq_total"


def test_anonymous_route_reaches_echo_over_tls_http2(https: httpx.Client) -> None:
    reply = https.get("/public/hello", params={"q": "1"})
    assert reply.status_code == 200
    assert reply.http_version == "HTTP/2"
    echoed = reply.json()
    assert echoed["method"] == "GET"
    assert echoed["path"] == "/public/hello"
    assert echoed["query"] == {"q": "1"}
    assert echoed["headers"]["x-forwarded-proto"] == "https"


def test_anonymous_route_over_tls_http1(gateway: Gateway) -> None:
    with gateway.https(http2=False) as client:
        reply = client.get("/public/hello")
    assert reply.status_code == 200
    assert reply.http_version == "HTTP/1.1"


def test_anonymous_route_over_plain_http(http: httpx.Client) -> None:
    reply = http.post("/public/echo", content=b'{"a": 1}', headers={"content-type": "application/json"})
    assert reply.status_code == 200
    assert reply.json()["body"] == '{"a": 1}'


def _tls_up_to(gateway: Gateway, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = gateway.tls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we mean to offer old TLS
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def test_tls_1_2_is_accepted(gateway: Gateway) -> None:
    with gateway.https(verify=_tls_up_to(gateway, ssl.TLSVersion.TLSv1_2), http2=False) as client:
        assert client.get("/public/hello").status_code == 200


def test_tls_below_1_2_is_refused_by_envoy(gateway: Gateway) -> None:
    with (
        pytest.raises(httpx.ConnectError, match=r"(?i)protocol.version"),
        gateway.https(verify=_tls_up_to(gateway, ssl.TLSVersion.TLSv1_1), http2=False) as client,
    ):
        client.get("/public/hello")


def test_route_needing_credentials_is_denied_by_authz(gateway: Gateway, https: httpx.Client) -> None:
    before = gateway.stat(AUTHZ_CALLS)
    reply = https.get("/locked/42")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="sidegate"'
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "error": "missing_credentials",
        "reason": "missing_credentials",
        "message": "this API requires credentials",
    }
    assert gateway.stat(AUTHZ_CALLS) == before + 1  # the callout really happened


def test_anonymous_route_makes_no_authz_callout(gateway: Gateway, https: httpx.Client) -> None:
    before = gateway.stat(AUTHZ_CALLS)
    for _ in range(20):
        assert https.get("/public/hello").status_code == 200
    assert gateway.stat(AUTHZ_CALLS) == before
    assert gateway.stat("cluster.sidegate_extproc.upstream_rq_total") == 0
    assert gateway.stat("cluster.sidegate_ratelimit.upstream_rq_total") == 0


def test_method_not_in_the_api_is_not_routed(https: httpx.Client) -> None:
    reply = https.delete("/public/hello")
    assert reply.status_code == 404
    assert reply.json()["error"] == "not_found"


def test_client_cannot_forge_identity_headers(https: httpx.Client) -> None:
    forged = {"x-consumer-id": "admin", "x-consumer-plan": "gold", "x-auth-method": "api_key", "x-auth-scopes": "*"}
    headers = https.get("/public/hello", headers=forged).json()["headers"]
    assert not set(forged) & set(headers)


def test_prefix_matches_whole_segments_only(https: httpx.Client) -> None:
    assert https.get("/publicity").status_code == 404
    assert https.get("/public").status_code == 200


def test_unknown_path_gets_json_404(http: httpx.Client) -> None:
    reply = http.get("/nowhere")
    assert reply.status_code == 404
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": "not_found", "message": "no API matches this path"}
