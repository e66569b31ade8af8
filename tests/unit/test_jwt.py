"""JWT validation, pure: every known attack gets its verdict, valid tokens their identity.

The clock is a number (``NOW``); keys are made with ``cryptography`` by ``tests.idp``'s helpers
(no server is started here). Each attack is a row: a token made from a valid one by changing one
thing, and the one verdict it must get.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz import errors, jwt
from authz.jwt import KeySet, Verified
from sidegate import config
from sidegate.config import Issuer
from tests.idp import SigningKey, b64, compact, hs_sign, new_key, segment

NOW = 1_800_000_000.0
ISS = "https://idp.example.com"
SECRET = b"s" * 48

GATEWAY = f"""
listeners: [{{name: http, port: 8080}}]
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
issuers:
  corp:
    issuer: {ISS}
    jwks_uri: {ISS}/jwks
    audiences: [orders-api, billing-api]
    algorithms: [RS256, RS384, PS256, ES256, ES384, EdDSA]
    typ: at+jwt
    leeway: 30s
    max_token_bytes: 4096
    plan_claim: plan
    version_claim: api_version
    claims: {{email: x-user-email, tenant: x-tenant-id, groups: x-groups}}
  shared:
    issuer: https://legacy.example.com
    algorithms: [HS256, RS256]
    jwks_uri: https://legacy.example.com/keys
    shared_secret_env: LEGACY_SECRET
    audiences: [orders-api]
    leeway: 0s
apis:
  - name: orders
    match: {{prefix: /orders}}
    service: echo
    auth: {{jwt: [corp, shared]}}
"""
POLICIES = config.parse(GATEWAY, "gw.yaml").issuers
CORP: Issuer = POLICIES["corp"]
SHARED: Issuer = POLICIES["shared"]

KEYS = {alg: new_key(alg, kid=f"k-{alg.lower()}") for alg in ("RS256", "ES256", "ES384", "EdDSA")}
PS_KEY = SigningKey("k-ps256", "PS256", KEYS["RS256"].private)  # the same RSA key, no JWK alg pin
KEYSET, SKIPPED = jwt.parse_jwks(
    {"keys": [k.public_jwk for k in KEYS.values()] + [{**PS_KEY.public_jwk, "alg": None, "kid": "k-ps256"}]}
)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": "svc-reporting",
        "aud": "orders-api",
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "exp": int(NOW) + 600,
        "scope": "orders:read orders:write",
        "email": "ops@example.com",
        "plan": "gold",
        "api_version": "2024-06-01",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def token(
    body: dict[str, Any] | bytes | None = None,
    *,
    key: SigningKey | None = None,
    sign: Callable[[bytes], bytes] | None = None,
    **header: Any,
) -> str:
    key = key or KEYS["RS256"]
    head: dict[str, Any] = {"alg": key.alg, "typ": "at+jwt", "kid": key.kid}
    head.update(header)
    head = {k: v for k, v in head.items() if v is not None}
    return compact(head, claims() if body is None else body, sign or key.sign)


def check(
    value: str,
    policy: Issuer = CORP,
    *,
    keys: KeySet | None = KEYSET,
    secret: bytes | None = None,
    now: float = NOW,
    name: str = "corp",
) -> Verified | str:
    parsed = jwt.parse(value, policy.max_token_bytes)
    if isinstance(parsed, str):
        return parsed
    return jwt.verify(parsed, policy, name=name, keys=keys, secret=secret, now=now)


def verdict(value: str, **kwargs: Any) -> str:
    result = check(value, **kwargs)
    return result if isinstance(result, str) else "ok"


# --- the attack table -------------------------------------------------------------------------

ATTACKER = new_key("RS256", kid="k-rs256")  # same kid as the real key, another key
ATTACKER_JWK = ATTACKER.public_jwk
PUBLIC_PEM = (
    KEYS["RS256"]
    .private.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
)
VALID = token()
HEADER, PAYLOAD, SIGNATURE = VALID.split(".")


def _tampered() -> str:
    forged = claims(scope="orders:read orders:write orders:admin")
    return f"{HEADER}.{segment(forged)}.{SIGNATURE}"


ATTACKS: list[tuple[str, str, str]] = [
    ("alg none", token(alg="none", kid=None, sign=lambda _: b""), "alg_none"),
    ("alg None with a signature", token(alg="None", sign=lambda _: b"x"), "alg_none"),
    ("HS256 signed with the RSA public key", token(alg="HS256", sign=hs_sign(PUBLIC_PEM)), "alg_not_allowed"),
    ("an algorithm not in the list", token(alg="RS512"), "alg_not_allowed"),
    ("expired", token(claims(exp=int(NOW) - 31)), "expired"),
    ("not yet valid", token(claims(nbf=int(NOW) + 31)), "not_yet_valid"),
    ("issued in the future", token(claims(iat=int(NOW) + 3600)), "not_yet_valid"),
    ("wrong iss", token(claims(iss="https://evil.example.com")), "issuer_unknown"),
    ("no iss", token(claims(iss=None)), "iss_missing"),
    ("wrong aud", token(claims(aud="payments-api")), "audience_mismatch"),
    ("no aud", token(claims(aud=None)), "aud_missing"),
    ("missing exp", token(claims(exp=None)), "exp_missing"),
    ("exp a string", token(claims(exp=str(int(NOW) + 600))), "claim_invalid"),
    ("exp a boolean", token(claims(exp=True)), "claim_invalid"),
    ("unknown kid", token(kid="k-nobody"), "kid_unknown"),
    (
        "jku to another JWKS, attacker's key",
        token(key=new_key("RS256", kid="evil"), jku="https://evil.example.com/jwks"),
        "kid_unknown",
    ),
    (
        "x5u to another cert, attacker's key",
        token(key=ATTACKER, x5u="https://evil.example.com/cert.pem"),
        "signature_invalid",
    ),
    ("embedded jwk of the attacker, real kid", token(key=ATTACKER, jwk=ATTACKER_JWK), "signature_invalid"),
    ("embedded x5c, attacker's key", token(key=new_key("RS256", kid="x5c"), x5c=["MIIBIjAN"]), "kid_unknown"),
    ("stripped signature", f"{HEADER}.{PAYLOAD}.", "signature_missing"),
    ("tampered payload", _tampered(), "signature_invalid"),
    ("another key with the same kid", token(key=ATTACKER), "signature_invalid"),
    ("signature of another token", f"{HEADER}.{PAYLOAD}.{token(claims(sub='x')).split('.')[2]}", "signature_invalid"),
    ("kid of an EC key for RS256", token(kid="k-es256"), "key_mismatch"),
    ("ES256 signature under a P-384 key's kid", token(key=KEYS["ES256"], kid="k-es384"), "key_mismatch"),
    ("PS256 with a key pinned to RS256", token(alg="PS256", kid="k-rs256"), "key_mismatch"),
    ("unknown crit", token(crit=["exp-ext"], **{"exp-ext": 1}), "crit_unsupported"),
    ("crit not a list", token(crit="b64"), "malformed"),
    ("typ JWT (an ID token?)", token(typ="JWT"), "typ_mismatch"),
    ("no typ", token(typ=None), "typ_mismatch"),
    ("kid a number", token(kid=7), "malformed"),
    ("garbage", "not-a-token", "malformed"),
    ("two segments", f"{HEADER}.{PAYLOAD}", "malformed"),
    ("JWE (five segments)", f"{HEADER}.a.b.c.d", "malformed"),
    ("bad base64", f"{HEADER}.{PAYLOAD}.@@@", "malformed"),
    ("padding in a segment", f"{HEADER}=.{PAYLOAD}.{SIGNATURE}", "malformed"),
    ("header not JSON", f"{b64(b'{alg')}.{PAYLOAD}.{SIGNATURE}", "malformed"),
    ("payload a list", token(b'["iss"]'), "malformed"),
    ("duplicate exp", token(b'{"exp":1,"exp":99999999999}'), "malformed"),
    ("NaN exp", token(b'{"exp":NaN}'), "malformed"),
    ("oversized", token(claims(pad="x" * 5000)), "too_large"),
    ("no consumer", token(claims(sub=None)), "consumer_missing"),
    ("consumer with a newline", token(claims(sub="a\r\nx-consumer-id: admin")), "claim_invalid"),
    ("consumer a list", token(claims(sub=["alice", "admin"])), "claim_invalid"),
    ("consumer a boolean", token(claims(sub=True)), "claim_invalid"),
    ("scope a number", token(claims(scope=7)), "claim_invalid"),
]


@pytest.mark.parametrize(("attack", "value", "expected"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_tokens_get_their_verdict(attack: str, value: str, expected: str) -> None:
    assert verdict(value) == expected


def test_the_table_starts_from_a_valid_token() -> None:
    assert verdict(VALID) == "ok"  # so each row fails for its one change, not another


def test_every_verdict_has_a_denial_and_all_are_401_invalid_token() -> None:
    for _, _, expected in ATTACKS:
        denial = errors.INVALID_TOKEN[expected]
        assert (denial.http_status, denial.error, denial.code) == (401, "invalid_token", f"token_{expected}")


# --- valid tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "ES384", "EdDSA"])
def test_each_asymmetric_algorithm_verifies(alg: str) -> None:
    result = check(token(key=KEYS[alg]))
    assert isinstance(result, Verified), result
    assert result.identity.method == "jwt"
    assert result.identity.issuer == "corp"


def test_pss_with_an_unpinned_rsa_key() -> None:
    assert verdict(token(key=PS_KEY, alg="PS256")) == "ok"


def test_identity_carries_consumer_scopes_plan_version_and_mapped_claims() -> None:
    result = check(token(claims(tenant=42, groups=["ops", "billing"])))
    assert isinstance(result, Verified)
    who = result.identity
    assert (who.consumer, who.scopes, who.plan, who.version) == (
        "svc-reporting",
        ("orders:read", "orders:write"),
        "gold",
        "2024-06-01",
    )
    assert dict(who.headers) == {"x-user-email": "ops@example.com", "x-tenant-id": "42", "x-groups": "ops,billing"}
    assert result.expires == NOW + 600


def test_scopes_from_scp_as_a_list_or_a_string() -> None:
    for scp in (["orders:read", "orders:write"], "orders:read orders:write"):
        result = check(token(claims(scope=None, scp=scp)))
        assert isinstance(result, Verified)
        assert result.identity.scopes == ("orders:read", "orders:write")


def test_scope_values_that_could_break_a_header_are_dropped() -> None:
    result = check(token(claims(scope='orders:read "quoted" a\\b')))
    assert isinstance(result, Verified)
    assert result.identity.scopes == ("orders:read",)


def test_a_claim_value_with_control_characters_is_not_forwarded() -> None:
    result = check(token(claims(email="a@example.com\r\nx-consumer-id: admin")))
    assert isinstance(result, Verified)
    assert "x-user-email" not in dict(result.identity.headers)


def test_aud_as_a_list_needs_one_match() -> None:
    assert verdict(token(claims(aud=["payments-api", "billing-api"]))) == "ok"
    assert verdict(token(claims(aud=["payments-api"]))) == "audience_mismatch"
    assert verdict(token(claims(aud=[1]))) == "claim_invalid"


def test_typ_may_carry_the_media_type_prefix() -> None:
    assert verdict(token(typ="application/at+JWT")) == "ok"


def test_jku_x5u_jwk_x5c_are_ignored_not_trusted() -> None:
    """A valid token with those headers still verifies, with the issuer's own key."""
    evil = {"jku": "https://evil/jwks", "x5u": "https://evil/c.pem", "jwk": ATTACKER_JWK, "x5c": ["MII"]}
    assert verdict(token(**evil)) == "ok"


# --- time, with the injected clock ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"exp": int(NOW) - 29}, "ok"),  # within the 30s leeway
        ({"exp": int(NOW) - 30}, "expired"),
        ({"nbf": int(NOW) + 30}, "ok"),
        ({"nbf": int(NOW) + 31}, "not_yet_valid"),
        ({"iat": int(NOW) + 30}, "ok"),
        ({"nbf": None, "iat": None}, "ok"),  # both optional
        ({"exp": NOW + 0.5}, "ok"),  # NumericDate may be fractional
    ],
)
def test_leeway_bounds(change: dict[str, Any], expected: str) -> None:
    assert verdict(token(claims(**change))) == expected


def test_the_same_token_expires_as_the_clock_moves() -> None:
    value = token(claims(exp=int(NOW) + 60))
    assert verdict(value, now=NOW + 89) == "ok"
    assert verdict(value, now=NOW + 90) == "expired"


# --- kid selection -------------------------------------------------------------------------------


def test_no_kid_uses_the_only_key_that_suits_else_refuses() -> None:
    one = jwt.parse_jwks({"keys": [KEYS["ES256"].public_jwk]})[0]
    assert verdict(token(key=KEYS["ES256"], kid=None), keys=one) == "ok"
    assert verdict(token(kid=None)) == "kid_unknown"  # two RSA keys suit RS256: ambiguous


def test_no_keys_yet_is_not_the_clients_fault() -> None:
    assert verdict(VALID, keys=None) == jwt.KEYS_UNAVAILABLE


# --- HS* only with the configured secret ---------------------------------------------------------


def hs_token(secret: bytes, **overrides: Any) -> str:
    body = claims(iss="https://legacy.example.com", **overrides)
    return compact({"alg": "HS256", "typ": "JWT"}, body, hs_sign(secret))


def test_hs256_with_the_shared_secret() -> None:
    assert verdict(hs_token(SECRET), policy=SHARED, secret=SECRET, name="shared") == "ok"


def test_hs256_with_the_rsa_public_key_as_secret_fails_even_where_hs256_is_allowed() -> None:
    assert verdict(hs_token(PUBLIC_PEM), policy=SHARED, secret=SECRET, name="shared") == "signature_invalid"


def test_hs256_without_a_secret_is_not_allowed() -> None:
    assert verdict(hs_token(SECRET), policy=SHARED, secret=None, name="shared") == "alg_not_allowed"


def test_zero_leeway_is_exact() -> None:
    value = hs_token(SECRET, exp=int(NOW))
    assert verdict(value, policy=SHARED, secret=SECRET, name="shared", now=NOW - 0.001) == "ok"
    assert verdict(value, policy=SHARED, secret=SECRET, name="shared", now=NOW) == "expired"


# --- JWKS parsing ----------------------------------------------------------------------------------


def test_jwks_keeps_signature_keys_and_says_why_it_skips_the_others() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_jwk = json.loads(jwt._VERIFIERS["RS256"].to_jwk(small.public_key()))  # type: ignore[attr-defined]
    private_jwk = json.loads(jwt._VERIFIERS["ES256"].to_jwk(KEYS["ES256"].private, as_dict=False))  # type: ignore[attr-defined]
    document = {
        "keys": [
            KEYS["RS256"].public_jwk,
            {"kty": "oct", "kid": "hmac", "k": base64.urlsafe_b64encode(b"x" * 32).decode()},
            {**KEYS["ES256"].public_jwk, "use": "enc"},
            {**small_jwk, "kid": "small"},
            {**private_jwk, "kid": "leaked"},
            {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not an object",
        ]
    }
    keys, skipped = jwt.parse_jwks(document)
    assert keys.kids == ("k-rs256",)
    assert len(skipped) == 7
    assert any("1024 bits" in s for s in skipped)
    assert any("private" in s for s in skipped)


@pytest.mark.parametrize("document", [[], {"keys": {}}, {"no": "keys"}, "text"])
def test_a_document_that_is_not_a_jwks_is_refused(document: object) -> None:
    with pytest.raises(ValueError, match="not a JWKS"):
        jwt.parse_jwks(document)


def test_the_keys_fixture_loaded() -> None:
    assert SKIPPED == []
    assert set(KEYSET.kids) == {"k-rs256", "k-es256", "k-es384", "k-eddsa", "k-ps256"}
