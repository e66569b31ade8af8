"""Bearer tokens through real Envoy: the attack table, rotation, IdP outage, introspection, mixed routes.

One stack for the module (``jwt_gateway.yaml``: Envoy, the sidecars, the echo upstream) and one
test IdP (``tests.idp``, a real HTTP server on loopback) that it discovers at start. Every token
sent is kept, so the last test can prove that none reached a log.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import free_port
from tests.e2e.conftest import Gateway, new_gateway, start
from tests.idp import RESOURCE_CLIENT, IdP, SigningKey, compact, hs_sign, new_key, segment

TEMPLATE = Path(__file__).with_name("jwt_gateway.yaml")
SECRET_ENV = "SIDEGATE_E2E_INTROSPECTION_SECRET"
INVALID = 'Bearer realm="sidegate", error="invalid_token"'
TOKENS: list[str] = []  # every token the tests sent: none may reach a log


@pytest.fixture(scope="module")
def idp() -> Iterator[IdP]:
    server = IdP(audience="orders-api", max_age=300, algs=("RS256", "ES256", "EdDSA")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(idp: IdP, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv(SECRET_ENV, RESOURCE_CLIENT[1])  # the sidecars read it at start
        running = new_gateway(tmp_path_factory.mktemp("jwt-stack"), TEMPLATE, idp=idp.port)
        running.stack.settings = replace(running.stack.settings, metrics_port=free_port())
        start(running.stack)
    try:
        yield running
    finally:
        running.stack.stop()


@pytest.fixture(scope="module")
def client(stack: Gateway) -> Iterator[httpx.Client]:
    with stack.https() as https:
        yield https


def bearer(token: str) -> dict[str, str]:
    TOKENS.append(token)
    return {"authorization": f"Bearer {token}"}


def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {within}s")
        time.sleep(0.05)


def wait_for_refetch_window() -> None:
    time.sleep(1.1)  # unknown_kid_refetch in jwt_gateway.yaml: at most one refetch per second


# --- the attack table -----------------------------------------------------------------------------

ATTACKER = new_key("RS256", kid="attacker")


def _public_pem(idp: IdP) -> bytes:
    public = idp.keys[idp.active_kid].private.public_key()
    return bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _same_kid_other_key(idp: IdP) -> str:
    return idp.mint(key=SigningKey(idp.active_kid, "RS256", ATTACKER.private))


def _tampered(idp: IdP) -> str:
    header, _, signature = idp.mint().split(".")
    return f"{header}.{segment(idp.claims(scope='orders:read orders:write orders:admin'))}.{signature}"


def _stripped(idp: IdP) -> str:
    return idp.mint().rsplit(".", 1)[0] + "."


ATTACKS: list[tuple[str, Callable[[IdP], str], str]] = [
    ("alg none", lambda idp: compact({"alg": "none", "typ": "at+jwt"}, idp.claims()), "token_alg_none"),
    (
        "HS256 signed with the IdP's RSA public key",
        lambda idp: compact(
            {"alg": "HS256", "typ": "at+jwt", "kid": idp.active_kid}, idp.claims(), hs_sign(_public_pem(idp))
        ),
        "token_alg_not_allowed",
    ),
    ("expired", lambda idp: idp.mint(idp.claims(exp=int(time.time()) - 3600)), "token_expired"),
    ("not yet valid", lambda idp: idp.mint(idp.claims(nbf=int(time.time()) + 3600)), "token_not_yet_valid"),
    ("wrong iss", lambda idp: idp.mint(idp.claims(iss="https://evil.example.com")), "token_issuer_unknown"),
    ("wrong aud", lambda idp: idp.mint(idp.claims(aud="payments-api")), "token_audience_mismatch"),
    ("missing exp", lambda idp: idp.mint(idp.claims(exp=None)), "token_exp_missing"),
    ("unknown kid", lambda idp: idp.mint(kid="nobody-knows-me"), "token_kid_unknown"),
    (
        "jku to the attacker's JWKS",
        lambda idp: idp.mint(key=ATTACKER, jku=idp.url("/attacker/jwks.json")),
        "token_kid_unknown",
    ),
    (
        "x5u to the attacker's cert",
        lambda idp: idp.mint(key=ATTACKER, x5u=idp.url("/attacker/cert.pem")),
        "token_kid_unknown",
    ),
    (
        "embedded jwk with the IdP's kid",
        lambda idp: idp.mint(key=ATTACKER, kid=idp.active_kid, jwk=ATTACKER.public_jwk, jku=idp.url("/attacker/k")),
        "token_signature_invalid",
    ),
    (
        "embedded x5c",
        lambda idp: idp.mint(key=ATTACKER, x5c=["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]),
        "token_kid_unknown",
    ),
    ("stripped signature", _stripped, "token_signature_missing"),
    ("tampered payload", _tampered, "token_signature_invalid"),
    ("signature from another key with the same kid", _same_kid_other_key, "token_signature_invalid"),
    ("garbage", lambda idp: "%%%garbage%%%", "token_malformed"),
    ("three segments of junk", lambda idp: "abc.def.ghi", "token_malformed"),
    ("oversized", lambda idp: idp.mint(idp.claims(pad="x" * 6000)), "token_too_large"),
    ("unknown crit", lambda idp: idp.mint(crit=["exp-ext"], **{"exp-ext": 1}), "token_crit_unsupported"),
    ("typ JWT where at+jwt is required", lambda idp: idp.mint(typ="JWT"), "token_typ_mismatch"),
    ("an opaque token the IdP never issued", lambda idp: secrets.token_urlsafe(32), "token_inactive"),
]


@pytest.mark.parametrize(("attack", "make", "reason"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_tokens_are_refused_through_envoy(
    idp: IdP, client: httpx.Client, attack: str, make: Callable[[IdP], str], reason: str
) -> None:
    reply = client.get("/orders/1", headers=bearer(make(idp)))
    assert reply.status_code == 401, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["www-authenticate"] == INVALID
    body = reply.json()
    assert set(body) == {"error", "reason", "message"}
    assert (body["error"], body["reason"]) == ("invalid_token", reason)
    assert "Traceback" not in reply.text
    assert not {path: n for path, n in idp.counts().items() if path.startswith("/attacker/")}


def test_the_attack_table_starts_from_a_valid_token(idp: IdP, client: httpx.Client) -> None:
    assert client.get("/orders/1", headers=bearer(idp.mint())).status_code == 200


def test_forged_key_urls_were_never_fetched(idp: IdP, client: httpx.Client) -> None:
    for path in ("/attacker/jwks.json", "/attacker/cert.pem", "/attacker/k"):
        assert idp.count(path) == 0
    assert idp.count("/.well-known/openid-configuration") >= 1  # the IdP did see authz, at start


# --- valid tokens ------------------------------------------------------------------------------------


def test_client_credentials_token_reaches_the_upstream_as_an_identity(idp: IdP, client: httpx.Client) -> None:
    idp.register_client("reporting", "reporting-secret")
    issued = httpx.post(
        idp.url("/token"),
        data={"grant_type": "client_credentials", "scope": "orders:read"},
        auth=("reporting", "reporting-secret"),
    ).json()
    reply = client.get("/orders/7", headers=bearer(issued["access_token"]))
    assert reply.status_code == 200, reply.text
    seen = reply.json()["headers"]
    assert seen["x-consumer-id"] == "reporting"
    assert seen["x-auth-method"] == "jwt"
    assert seen["x-auth-scopes"] == "orders:read"
    assert "authorization" not in seen  # the token never goes upstream


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_published_key_type_is_accepted(idp: IdP, client: httpx.Client, alg: str) -> None:
    key = next(k for k in idp.keys.values() if k.alg == alg and k.kid in idp.published)
    assert client.get("/orders/1", headers=bearer(idp.mint(key=key))).status_code == 200


def test_claims_become_headers_and_forged_ones_are_stripped(idp: IdP, client: httpx.Client) -> None:
    token = idp.mint(idp.claims(sub="svc-billing", email="billing@example.com", plan="gold"))
    forged = {"x-consumer-id": "admin", "x-tenant-id": "other-tenant", "x-user-email": "ceo@example.com"}
    seen = client.get("/orders/1", headers={**forged, **bearer(token)}).json()["headers"]
    assert seen["x-consumer-id"] == "svc-billing"
    assert seen["x-consumer-plan"] == "gold"
    assert seen["x-user-email"] == "billing@example.com"
    assert "x-tenant-id" not in seen  # the token has no tenant: the client's is removed
    assert "authorization" not in seen


def test_anonymous_routes_strip_claim_headers_too(client: httpx.Client) -> None:
    forged = {"x-consumer-id": "admin", "x-tenant-id": "other-tenant", "x-user-email": "ceo@example.com"}
    seen = client.get("/public/hello", headers=forged).json()["headers"]
    assert not set(forged) & set(seen)


def test_missing_token_is_401_with_a_bare_challenge(client: httpx.Client) -> None:
    reply = client.get("/orders/1")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="sidegate"'
    assert reply.json() == {
        "error": "invalid_token",
        "reason": "token_missing",
        "message": "a bearer token is required",
    }


def test_missing_scope_is_403_naming_it(idp: IdP, client: httpx.Client) -> None:
    reply = client.post("/orders", headers=bearer(idp.mint(idp.claims(scope="orders:read"))), json={})
    assert reply.status_code == 403
    assert (
        reply.headers["www-authenticate"] == 'Bearer realm="sidegate", error="insufficient_scope", scope="orders:write"'
    )
    assert reply.json()["scope"] == "orders:write"
    writer = idp.mint(idp.claims(scp=["orders:read", "orders:write"], scope=None))
    assert client.post("/orders", headers=bearer(writer), json={}).status_code == 200


# --- keys at the IdP change or vanish ------------------------------------------------------------------


def test_rotation_at_the_idp_is_accepted_without_restart(idp: IdP, client: httpx.Client) -> None:
    wait_for_refetch_window()
    before = idp.count("/jwks")
    new = idp.rotate("ES256")
    reply = client.get("/orders/1", headers=bearer(idp.mint()))
    assert reply.status_code == 200, reply.text  # the unknown kid made authz refetch, once
    assert idp.count("/jwks") == before + 1
    assert client.get("/orders/1", headers=bearer(idp.mint(key=idp.keys[new.kid]))).status_code == 200
    assert idp.count("/jwks") == before + 1  # now known: no more fetches


def test_a_flood_of_unknown_kids_is_one_refetch_per_interval(idp: IdP, client: httpx.Client) -> None:
    wait_for_refetch_window()
    before = idp.count("/jwks")
    started = time.monotonic()
    for i in range(20):
        reply = client.get("/orders/1", headers=bearer(idp.mint(key=new_key("ES256", kid=f"flood-{i}"))))
        assert reply.status_code == 401
    took = time.monotonic() - started
    assert idp.count("/jwks") - before <= 1 + int(took)  # one per second at most, not one per token


def test_idp_down_keeps_accepting_valid_tokens(idp: IdP, stack: Gateway, client: httpx.Client) -> None:
    fresh = idp.mint(idp.claims(sub="during-outage"))  # never seen: not in authz's token cache
    unknown = idp.mint(key=new_key("RS256", kid="made-during-outage"))
    idp.stop()
    try:
        wait_for_refetch_window()
        reply = client.get("/orders/1", headers=bearer(fresh))
        assert reply.status_code == 200, reply.text
        assert reply.json()["headers"]["x-consumer-id"] == "during-outage"
        refused = client.get("/orders/1", headers=bearer(unknown))  # refetch fails fast: still a clean 401
        assert (refused.status_code, refused.json()["reason"]) == (401, "token_kid_unknown")
        opaque = client.get("/orders/1", headers=bearer(secrets.token_urlsafe(24)))
        assert (opaque.status_code, opaque.json()["reason"]) == (503, "introspection_unavailable")
    finally:
        idp.start()
    log = stack.stack.child(next(c.name for c in stack.stack.children if c.name.startswith("sidecars")))
    assert log.log_path is not None
    assert '"jwks fetch failed"' in log.log_path.read_text()


# --- opaque tokens and mixed routes --------------------------------------------------------------------------


def test_opaque_token_introspected_then_revoked(idp: IdP, client: httpx.Client) -> None:
    idp.register_client("batch-job", "batch-secret", token_format="opaque")
    token = httpx.post(
        idp.url("/token"),
        data={"grant_type": "client_credentials", "scope": "orders:read", "client_id": "batch-job"},
        auth=("batch-job", "batch-secret"),
    ).json()["access_token"]
    assert token.count(".") == 0  # opaque
    reply = client.get("/orders/1", headers=bearer(token))
    assert reply.status_code == 200, reply.text
    seen = reply.json()["headers"]
    assert (seen["x-consumer-id"], seen["x-auth-method"]) == ("batch-job", "introspection")
    idp.revoke(token)
    eventually(lambda: client.get("/orders/1", headers=bearer(token)).status_code == 401, within=3.0)  # cache_ttl 1s
    assert client.get("/orders/1", headers=bearer(token)).json()["reason"] == "token_inactive"


def create_key(stack: Gateway, consumer: str, scopes: str) -> str:
    argv = [sys.executable, "-m", "sidegate", "keys", "--config", str(stack.stack.config_path)]
    argv += ["--state-dir", str(stack.stack.state_dir), "--json", "create", "--consumer", consumer, "--scopes", scopes]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    key: str = json.loads(result.stdout)["key"]
    TOKENS.append(key)
    return key


def test_the_same_route_takes_an_api_key_or_a_jwt(idp: IdP, stack: Gateway, client: httpx.Client) -> None:
    key = create_key(stack, "acme", "orders:read")
    by_key = client.get("/mixed/1", headers={"x-api-key": key, "authorization": "Bearer not-for-upstream"})
    assert by_key.status_code == 200, by_key.text
    seen = by_key.json()["headers"]
    assert (seen["x-consumer-id"], seen["x-auth-method"]) == ("acme", "api_key")
    assert "authorization" not in seen
    assert "x-api-key" not in seen
    by_jwt = client.get("/mixed/1", headers=bearer(idp.mint()))
    assert by_jwt.status_code == 200, by_jwt.text
    assert by_jwt.json()["headers"]["x-auth-method"] == "jwt"
    neither = client.get("/mixed/1")
    assert neither.status_code == 401
    assert neither.headers["www-authenticate"] == 'Bearer realm="sidegate", ApiKey realm="sidegate"'
    bad_jwt = client.get("/mixed/1", headers=bearer(idp.mint(idp.claims(aud="elsewhere"))))
    assert (bad_jwt.status_code, bad_jwt.headers["www-authenticate"]) == (401, INVALID)
    bad_key = client.get("/mixed/1", headers={"x-api-key": "sg_live_nope"})
    assert bad_key.headers["www-authenticate"] == 'ApiKey realm="sidegate", error="invalid_api_key"'


def test_no_token_or_secret_in_any_log(stack: Gateway) -> None:
    """Last on purpose: it reads the logs of everything the tests above did."""
    assert len(TOKENS) > 30
    needles = [t for t in TOKENS if len(t) > 12] + [RESOURCE_CLIENT[1]]
    logs = {c.name: c.log_path.read_text(errors="replace") for c in stack.stack.children if c.log_path}
    assert any("denied" in text for text in logs.values())  # the logs are really there
    leaks = [(name, n[:16]) for name, text in logs.items() for n in needles if n in text]
    assert not leaks


# --- identity headers the gateway did not set never reach a service ------------------------------------

FORGED = {
    name: f"forged-{i}"
    for i, name in enumerate(
        (
            "x-user-id",
            "x-client-id",
            "x-auth-subject",
            "x-auth-client-id",
            "x-scopes",
            "x-authenticated-user",
            "x-forwarded-user",
            "x-forwarded-email",
            "x-forwarded-groups",
            "x-auth-request-user",
            "x-jwt-payload",
            "x-principal",
            "x-api-key-id",
            "x-consumer-id",
            "x-consumer-custom",
            "x-auth-method",
            "x-auth-scopes",
            "x-auth-key-id",
            "x-user-email",
            "x-tenant-id",
            "X-User-Roles",  # any case: HTTP/2 lower-cases it, Envoy matches it lower-cased
        )
    )
}


def test_forged_identity_headers_never_reach_the_upstream(idp: IdP, stack: Gateway, client: httpx.Client) -> None:
    idp.register_client("forger-job", "forger-secret", token_format="opaque")
    credentials = {
        "none": ("/public/hello", {}),
        "api_key": ("/mixed/1", {"x-api-key": create_key(stack, "acme", "orders:read")}),
        "jwt": ("/mixed/1", bearer(idp.mint(idp.claims(sub="svc-jwt", email="jwt@example.com")))),
        "introspection": ("/mixed/1", bearer(idp.issue("forger-job", "orders:read"))),
    }
    for kind, (path, headers) in credentials.items():
        reply = client.get(path, headers={**FORGED, **headers})
        assert reply.status_code == 200, (kind, reply.text)
        seen = reply.json()["headers"]
        leaked = {name: value for name, value in seen.items() if value.startswith("forged-")}
        assert leaked == {}, kind
        assert seen.get("x-auth-method") == (None if kind == "none" else kind), kind  # no authz on /public
        if kind == "jwt":
            assert seen["x-user-email"] == "jwt@example.com"  # set by the gateway after the strip


def test_a_header_outside_the_list_still_reaches_the_upstream(client: httpx.Client) -> None:
    seen = client.get("/public/hello", headers={"x-request-color": "blue"}).json()["headers"]
    assert seen["x-request-color"] == "blue"  # the strip is a list, not everything x-*


# --- shadow mode: decided, logged and counted, but let through -----------------------------------------


def shadow_denials(stack: Gateway, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.stack.settings.metrics_port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sidegate_authz_shadow_denials_total{") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_shadow_mode_lets_denied_requests_through_and_counts_them(
    idp: IdP, stack: Gateway, client: httpx.Client
) -> None:
    missing = {"api": "shadowed", "status": "401", "reason": "token_missing"}
    scope = {"api": "shadowed", "status": "403", "reason": "insufficient_scope"}
    before = shadow_denials(stack, **missing), shadow_denials(stack, **scope)
    anonymous = client.get("/shadowed/1", headers={"x-consumer-id": "admin"})
    assert anonymous.status_code == 200, anonymous.text
    assert "x-consumer-id" not in anonymous.json()["headers"]  # let through with no identity
    token = idp.mint(idp.claims(sub="svc-shadow", scope="orders:read"))  # lacks orders:admin
    lacking = client.get("/shadowed/1", headers=bearer(token))
    assert lacking.status_code == 200, lacking.text
    seen = lacking.json()["headers"]
    assert "authorization" not in seen  # the credential stays the gateway's
    assert "x-consumer-id" not in seen
    allowed = client.get("/shadowed/1", headers=bearer(idp.mint(idp.claims(sub="svc-admin", scope="orders:admin"))))
    assert allowed.json()["headers"]["x-consumer-id"] == "svc-admin"  # an allowed request is as usual
    assert shadow_denials(stack, **missing) == before[0] + 1
    assert shadow_denials(stack, **scope) == before[1] + 1
    log = stack.stack.child(next(c.name for c in stack.stack.children if c.name.startswith("sidecars")))
    assert log.log_path is not None
    lines = [json.loads(line) for line in log.log_path.read_text().splitlines() if "shadow mode" in line]
    assert {(line["api"], line["status"], line["code"]) for line in lines} >= {
        ("shadowed", 401, "token_missing"),
        ("shadowed", 403, "insufficient_scope"),
    }


def test_a_key_dropped_at_the_idp_stops_its_cached_tokens(idp: IdP, client: httpx.Client) -> None:
    wait_for_refetch_window()
    old = idp.mint(idp.claims(sub="before-compromise"))
    assert client.get("/orders/1", headers=bearer(old)).status_code == 200  # verified, and cached
    idp.rotate("RS256", retire_old=True)  # the IdP drops the old key, as after a compromise
    fresh = client.get("/orders/1", headers=bearer(idp.mint()))  # a new kid: fetched at once
    assert fresh.status_code == 200, fresh.text
    refused = client.get("/orders/1", headers=bearer(old))
    assert (refused.status_code, refused.json()["reason"]) == (401, "token_kid_unknown")
