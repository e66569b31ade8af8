"""Bearer tokens around the pure validation: config, credentials, challenges, the caches, Bearer.

No sockets: the IdP is a fake ``Http`` answering from a dict, the clock a number that tests move,
and every coroutine runs under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from authz import credentials, decision, errors, introspection, jwks, jwt
from authz.decision import CheckInput, Identity
from authz.errors import IdpUnavailable
from authz.introspection import Introspector
from authz.jwks import JwksSource, Reply
from authz.jwt import KeySet
from authz.memo import Memo, digest
from authz.sidecar import bearer_verifiers
from authz.verifiers.introspection import IntrospectionVerifier
from authz.verifiers.jwt import JwtVerifier
from sidegate import config, contract
from sidegate.errors import ConfigError, SettingsError
from tests.idp import compact, new_key
from tests.tokens import Tokens

ISS = "https://idp.example.com"
NOW = 1_800_000_000.0
GATEWAY = f"""
listeners: [{{name: http, port: 8080}}]
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
issuers:
  corp:
    issuer: {ISS}
    jwks_uri: {ISS}/jwks
    audiences: [orders-api]
    claims: {{email: x-user-email}}
    jwks: {{unknown_kid_refetch: 10s, min_refresh: 1m, max_refresh: 1h, refresh: 5m}}
    introspection:
      endpoint: {ISS}/introspect
      client_id: sidegate
      client_secret_env: CORP_INTROSPECTION_SECRET
      cache_ttl: 30s
  partner:
    issuer: https://partner.example.com
    discovery: true
    audiences: [orders-api]
    claims: {{org: x-partner-org}}
apis:
  - name: orders
    match: {{prefix: /orders}}
    service: echo
    auth: {{jwt: [corp], scopes: {{GET: [orders:read], POST: [orders:write]}}}}
  - name: partners
    match: {{prefix: /partners}}
    service: echo
    auth: {{jwt: [partner]}}
  - name: mixed
    match: {{prefix: /mixed}}
    service: echo
    auth: {{api_key: true, jwt: [corp, partner], scopes: [orders:read]}}
  - name: keys
    match: {{prefix: /keys}}
    service: echo
    auth: {{api_key: true}}
"""
GW = config.parse(GATEWAY, "gw.yaml")
KEY = new_key("RS256", kid="k1")


def api(name: str) -> config.Api:
    found = GW.api(name)
    assert found is not None
    return found


def claims(**overrides: Any) -> dict[str, Any]:
    base = {"iss": ISS, "sub": "svc", "aud": "orders-api", "exp": int(NOW) + 600, "scope": "orders:read"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: Any = KEY, **overrides: Any) -> str:
    return compact({"alg": "RS256", "kid": key.kid, "typ": "at+jwt"}, claims(**overrides), key.sign)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- config -------------------------------------------------------------------------------------


def test_issuers_load_with_defaults() -> None:
    corp = GW.issuers["corp"]
    assert corp.algorithms == ("RS256", "ES256")
    assert (corp.leeway, corp.max_token_bytes, corp.consumer_claim, corp.typ) == (30.0, 8192, "sub", None)
    assert corp.introspection is not None
    assert corp.introspection.cache_ttl == 30.0
    assert api("mixed").auth.jwt == ("corp", "partner")
    assert GW.claim_headers == ("x-partner-org", "x-user-email")


def parse_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, "gw.yaml")
    return str(info.value)


def with_issuer(body: str, auth: str = "{jwt: [corp]}") -> str:
    return f"""\
listeners: [{{name: http, port: 8080}}]
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
issuers:
  corp:
{body}
apis:
  - name: orders
    match: {{prefix: /orders}}
    service: echo
    auth: {auth}
"""


@pytest.mark.parametrize("header", contract.IDENTITY_HEADERS)
def test_no_claim_can_be_mapped_onto_a_header_authz_sets(header: str) -> None:
    text = with_issuer(f"    issuer: {ISS}\n    discovery: true\n    audiences: [a]\n    claims: {{email: {header}}}")
    assert "issuers.corp.claims.email" in parse_error(text)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("    issuer: http://idp.example.com\n    discovery: true\n    audiences: [a]", "must be https"),
        ("    issuer: https://u:p@idp.example.com\n    discovery: true\n    audiences: [a]", "no credentials"),
        ("    issuer: https://idp.example.com\n    audiences: [a]", "RS256 needs the issuer's keys"),
        ("    issuer: https://idp.example.com\n    discovery: true\n    audiences: []", "must not be empty"),
        ("    issuer: https://i.example\n    discovery: true\n    audiences: [a]\n    algorithms: [none]", "never"),
        ("    issuer: https://i.example\n    discovery: true\n    audiences: [a]\n    leeway: 10m", "between 0s"),
        ("    issuer: https://i.example\n    discovery: true\n    audiences: [a]\n    shared_secret: x", "never go"),
    ],
)
def test_issuer_problems(body: str, problem: str) -> None:
    assert problem in parse_error(with_issuer(body))


def test_http_issuer_on_loopback_is_allowed_for_development() -> None:
    text = with_issuer("    issuer: http://127.0.0.1:8181\n    discovery: true\n    audiences: [a]")
    assert config.parse(text).issuers["corp"].issuer == "http://127.0.0.1:8181"


def test_anonymous_api_takes_no_jwt() -> None:
    text = with_issuer(f"    issuer: {ISS}\n    discovery: true\n    audiences: [a]", "{anonymous: true, jwt: [corp]}")
    assert parse_error(text) == "gw.yaml:12: apis[0].auth: anonymous: true takes no credentials, scopes or shadow mode"


# --- credentials ----------------------------------------------------------------------------------


def find(name: str, headers: Mapping[str, str], path: str = "/") -> credentials.Credential | None:
    return credentials.find(headers, path, api(name).auth, GW.api_keys)


def test_bearer_tokens_only_where_the_api_accepts_them() -> None:
    assert find("orders", {"authorization": "Bearer abc"}) == credentials.Credential("opaque", "abc", "authorization")
    assert find("orders", {"authorization": "Bearer a.b.c"}) == credentials.Credential("jwt", "a.b.c", "authorization")
    assert find("orders", {"authorization": "bearer  abc "}) is not None  # the scheme is case-insensitive
    assert find("keys", {"authorization": "Bearer abc"}) is None
    assert find("orders", {"authorization": "ApiKey abc"}) is None
    assert find("orders", {"authorization": "Bearer"}) is None
    assert find("orders", {}, "/orders?access_token=abc") is None  # never from the query


def test_an_api_key_goes_first_on_an_api_accepting_both() -> None:
    found = find("mixed", {"x-api-key": "k", "authorization": "Bearer t"})
    assert found is not None
    assert found.kind == "api_key"
    found = find("mixed", {"authorization": "Bearer t"})
    assert found is not None
    assert found.kind == "opaque"


# --- challenges and decisions (RFC 6750) --------------------------------------------------------------


def header(result: decision.Decision, name: str) -> str:
    return dict(result.headers)[name]


def test_missing_token_challenge_names_no_error() -> None:
    result = decision.missing(api("orders"))
    assert (result.status, header(result, "www-authenticate")) == (401, 'Bearer realm="sidegate"')
    assert json.loads(result.body) == {
        "error": "invalid_token",
        "reason": "token_missing",
        "message": "a bearer token is required",
    }


def test_missing_credential_on_an_api_accepting_both_offers_both_schemes() -> None:
    result = decision.missing(api("mixed"))
    assert header(result, "www-authenticate") == 'Bearer realm="sidegate", ApiKey realm="sidegate"'
    assert json.loads(result.body)["reason"] == "missing_credentials"


def test_missing_api_key_challenge_is_unchanged() -> None:
    assert header(decision.missing(api("keys")), "www-authenticate") == 'ApiKey realm="sidegate"'


def test_invalid_token_challenge_even_on_an_api_accepting_keys() -> None:
    result = decision.deny(errors.INVALID_TOKEN["expired"], api("mixed"))
    assert header(result, "www-authenticate") == 'Bearer realm="sidegate", error="invalid_token"'
    assert json.loads(result.body)["reason"] == "token_expired"


def test_idp_outage_is_503_without_a_challenge() -> None:
    result = decision.deny(errors.JWKS_UNAVAILABLE, api("orders"))
    assert result.status == 503
    assert "www-authenticate" not in dict(result.headers)


def check(method: str = "GET", headers: Mapping[str, str] | None = None) -> CheckInput:
    return CheckInput("orders", method, "/orders/1", headers or {})


JWT_IDENTITY = Identity(
    "jwt", "svc", ("orders:read",), "gold", None, None, issuer="corp", headers=(("x-user-email", "a@b.c"),)
)
BEARER = credentials.Credential("jwt", "t.t.t", header="authorization")


def test_insufficient_scope_names_the_scope_in_a_bearer_challenge() -> None:
    result = decision.authorize(api("mixed"), check("POST"), JWT_IDENTITY, BEARER)
    assert result.allowed  # mixed needs orders:read only
    result = decision.authorize(api("orders"), check("POST"), JWT_IDENTITY, BEARER, GW.claim_headers)
    assert (result.status, result.code) == (403, "insufficient_scope")
    assert header(result, "www-authenticate") == (
        'Bearer realm="sidegate", error="insufficient_scope", scope="orders:write"'
    )


def test_allow_sets_claim_headers_strips_forged_ones_and_the_token() -> None:
    result = decision.authorize(api("orders"), check(), JWT_IDENTITY, BEARER, GW.claim_headers)
    assert result.allowed
    set_ = dict(result.headers)
    assert set_["x-consumer-id"] == "svc"
    assert set_["x-auth-method"] == "jwt"
    assert set_["x-consumer-plan"] == "gold"
    assert set_["x-user-email"] == "a@b.c"
    assert "authorization" in result.remove
    assert "x-partner-org" in result.remove  # another issuer's claim header, forged by the client
    assert "x-user-email" not in result.remove
    assert result.metadata["auth_method"] == "jwt"
    assert result.metadata["consumer"] == "svc"
    assert result.metadata["plan"] == "gold"


def test_api_key_on_a_mixed_api_also_strips_authorization_and_claim_headers() -> None:
    who = Identity("api_key", "acme", ("orders:read",), key_id="abc")
    key = credentials.Credential("api_key", "k", header="x-api-key")
    result = decision.authorize(api("mixed"), check(), who, key, GW.claim_headers)
    assert {"authorization", "x-api-key", "x-user-email", "x-partner-org"} <= set(result.remove)


# --- the token cache ---------------------------------------------------------------------------------


def test_token_cache_entries_end_at_their_expiry_and_the_cache_is_bounded() -> None:
    clock = Clock()
    cache: Memo[bytes, str] = Memo(10, clock)
    cache.put(digest("a"), "A", NOW + 5)
    cache.put(digest("dead"), "D", NOW)  # already expired: not kept
    assert cache.get(digest("a")) == "A"
    assert cache.get(digest("dead")) is None
    clock.now = NOW + 5
    assert cache.get(digest("a")) is None
    for i in range(25):
        cache.put(digest(str(i)), str(i), NOW + 100)
    assert len(cache) <= 10
    assert cache.get(digest("24")) == "24"  # the newest stays
    assert cache.get(digest("0")) is None  # the oldest went


def test_token_cache_is_keyed_by_sha256_not_the_token() -> None:
    cache: Memo[bytes, str] = Memo(clock=Clock())
    cache.put(digest("secret-token"), "v", NOW + 10)
    assert all(len(key) == 32 and b"secret" not in key for key in cache._entries)


# --- Bearer: cache, refetch on unknown kid, issuers per API ------------------------------------------


class StaticKeys:
    """A key source with fixed keys that counts refetches (a JwksSource stand-in)."""

    def __init__(self, *keys: Any, fresh: KeySet | None = None) -> None:
        self.keys: KeySet | None = jwt.parse_jwks({"keys": [k.public_jwk for k in keys]})[0] if keys else None
        self.fresh = fresh
        self.refetches = 0

    async def refetch(self) -> KeySet | None:
        self.refetches += 1
        if self.fresh is not None:
            self.keys = self.fresh
        return self.fresh


def bearer(source: StaticKeys, clock: Clock, **kwargs: Any) -> Tokens:
    return Tokens(GW, clock, sources={"corp": source}, **kwargs)


def test_a_cached_token_is_not_verified_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, source = Clock(), StaticKeys(KEY)
    tokens = bearer(source, clock)
    calls: list[int] = []
    real = jwt.verify

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(jwt, "verify", counted)
    value = mint(exp=int(NOW) + 60)
    first = asyncio.run(tokens.verify(value, api("orders")))
    assert isinstance(first, Identity)
    assert first.consumer == "svc"
    assert asyncio.run(tokens.verify(value, api("orders"))) == first
    assert len(calls) == 1
    clock.now = NOW + 60  # the entry ends at exp: validated again (and accepted, within the leeway)
    assert asyncio.run(tokens.verify(value, api("orders"))) == first
    assert len(calls) == 2
    clock.now = NOW + 90
    assert asyncio.run(tokens.verify(value, api("orders"))) == errors.INVALID_TOKEN["expired"]
    assert len(calls) == 3


def test_a_key_removed_from_the_jwks_revokes_its_cached_tokens_at_once() -> None:
    rotated = new_key("RS256", kid="k2")
    source = StaticKeys(KEY, rotated)
    tokens = bearer(source, Clock())
    old, new = mint(KEY, sub="old"), mint(rotated, sub="new")
    assert isinstance(asyncio.run(tokens.verify(old, api("orders"))), Identity)
    assert isinstance(asyncio.run(tokens.verify(new, api("orders"))), Identity)
    assert len(tokens.cache) == 2
    source.keys = jwt.parse_jwks({"keys": [rotated.public_jwk]})[0]  # the IdP dropped k1 (a refresh)
    assert asyncio.run(tokens.verify(old, api("orders"))) == errors.INVALID_TOKEN["kid_unknown"]
    assert len(tokens.cache) == 1  # dropped, not left to expire
    assert asyncio.run(tokens.verify(new, api("orders"))) == Identity(
        "jwt", "new", ("orders:read",), issuer="corp"
    )  # k2's tokens stay cached and valid


def test_a_cached_token_without_a_kid_is_checked_again_when_the_keys_change() -> None:
    source = StaticKeys(KEY)
    tokens = bearer(source, Clock())
    value = compact({"alg": "RS256", "typ": "at+jwt"}, claims(), KEY.sign)  # one key: no kid needed
    assert isinstance(asyncio.run(tokens.verify(value, api("orders"))), Identity)
    source.keys = jwt.parse_jwks({"keys": [new_key("RS256", kid="k9").public_jwk]})[0]
    assert asyncio.run(tokens.verify(value, api("orders"))) == errors.INVALID_TOKEN["signature_invalid"]


def test_a_cached_token_is_refused_by_an_api_not_accepting_its_issuer() -> None:
    tokens = bearer(StaticKeys(KEY), Clock())
    value = mint()
    assert isinstance(asyncio.run(tokens.verify(value, api("orders"))), Identity)
    assert asyncio.run(tokens.verify(value, api("partners"))) == errors.INVALID_TOKEN["issuer_unknown"]


def test_unknown_kid_refetches_then_accepts_the_new_key() -> None:
    rotated = new_key("RS256", kid="k2")
    fresh = jwt.parse_jwks({"keys": [KEY.public_jwk, rotated.public_jwk]})[0]
    source = StaticKeys(KEY, fresh=fresh)
    result = asyncio.run(bearer(source, Clock()).verify(mint(rotated), api("orders")))
    assert isinstance(result, Identity)
    assert source.refetches == 1


def test_unknown_kid_stays_refused_when_the_refetch_brings_nothing() -> None:
    source = StaticKeys(KEY)
    result = asyncio.run(bearer(source, Clock()).verify(mint(new_key("RS256", kid="kx")), api("orders")))
    assert result == errors.INVALID_TOKEN["kid_unknown"]
    assert source.refetches == 1


def test_no_keys_ever_is_503() -> None:
    result = asyncio.run(bearer(StaticKeys(), Clock()).verify(mint(), api("orders")))
    assert result is errors.JWKS_UNAVAILABLE


def test_tokens_are_checked_against_the_apis_own_limits_and_issuers() -> None:
    tokens = bearer(StaticKeys(KEY), Clock())
    assert asyncio.run(tokens.verify("x" * 9000, api("orders"))) == errors.INVALID_TOKEN["too_large"]
    assert asyncio.run(tokens.verify("a b", api("orders"))) == errors.INVALID_TOKEN["malformed"]
    other = mint(iss="https://partner.example.com")  # a known issuer, but not this API's
    assert asyncio.run(tokens.verify(other, api("orders"))) == errors.INVALID_TOKEN["issuer_unknown"]
    assert asyncio.run(tokens.verify(mint(iss=None), api("orders"))) == errors.INVALID_TOKEN["iss_missing"]
    # an opaque token on an API whose issuers have no introspection
    assert asyncio.run(tokens.verify("opaque-token", api("partners"))) == errors.INVALID_TOKEN["malformed"]


# --- introspection -----------------------------------------------------------------------------------


class FakeHttp:
    """Answers from ``routes`` (url → Reply or an exception) and records every request."""

    def __init__(self, routes: dict[str, Reply | Exception]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, Mapping[str, str] | None, tuple[str, str] | None]] = []

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        form: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> Reply:
        self.requests.append((method, url, form, auth))
        answer = self.routes.get(url, Reply(404, b"{}", {}))
        if isinstance(answer, Exception):
            raise answer
        return answer


def reply(body: object, status: int = 200, **headers: str) -> Reply:
    return Reply(status, json.dumps(body).encode(), {k.replace("_", "-"): v for k, v in headers.items()})


CORP = GW.issuers["corp"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"active": False}, "inactive"),
        ({"active": "true", "sub": "s"}, "inactive"),
        ({"active": True, "sub": "s", "exp": NOW - 31}, "expired"),
        ({"active": True, "sub": "s", "nbf": NOW + 31}, "not_yet_valid"),
        ({"active": True, "sub": "s", "iss": "https://other.example.com"}, "issuer_unknown"),
        ({"active": True, "sub": "s", "aud": ["payments"]}, "audience_mismatch"),
        ({"active": True}, "consumer_missing"),
    ],
)
def test_introspection_answers_that_are_refused(answer: dict[str, Any], expected: str) -> None:
    assert introspection.judge(answer, CORP, "corp", NOW, 30) == expected


def test_introspection_identity_is_cached_until_the_earlier_of_exp_and_ttl() -> None:
    answer = {"active": True, "client_id": "svc", "scope": "orders:read", "exp": NOW + 10, "email": "a@b.c"}
    result = introspection.judge(answer, CORP, "corp", NOW, 30)
    assert isinstance(result, jwt.Verified)
    assert (result.identity.consumer, result.identity.method, result.expires) == ("svc", "introspection", NOW + 10)
    assert dict(result.identity.headers) == {"x-user-email": "a@b.c"}
    longer = introspection.judge({**answer, "exp": NOW + 3600}, CORP, "corp", NOW, 30)
    assert isinstance(longer, jwt.Verified)
    assert longer.expires == NOW + 30


def test_introspector_authenticates_caches_and_shares_concurrent_misses() -> None:
    clock = Clock()
    answer = {"active": True, "sub": "svc", "scope": "orders:read", "exp": NOW + 600}
    http = FakeHttp({f"{ISS}/introspect": reply(answer)})
    inspector = Introspector("corp", CORP, "p@ss word", http, clock)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(inspector.introspect("opaque", digest("opaque")) for _ in range(5)))

    results = asyncio.run(burst())
    assert all(isinstance(r, jwt.Verified) for r in results)
    assert len(http.requests) == 1
    method, url, form, auth = http.requests[0]
    assert (method, url, form) == ("POST", f"{ISS}/introspect", {"token": "opaque", "token_type_hint": "access_token"})
    assert auth == ("sidegate", "p%40ss+word")  # RFC 6749 §2.3.1: form-encoded before Basic
    clock.now = NOW + 29
    asyncio.run(inspector.introspect("opaque", digest("opaque")))
    assert len(http.requests) == 1  # cached for cache_ttl
    clock.now = NOW + 30
    asyncio.run(inspector.introspect("opaque", digest("opaque")))
    assert len(http.requests) == 2


def test_introspection_endpoint_comes_from_discovery_once_and_a_failed_discovery_is_503() -> None:
    discovered = CORP.model_copy(
        update={
            "discovery": True,
            "jwks_uri": None,
            "introspection": CORP.introspection.model_copy(update={"endpoint": None}) if CORP.introspection else None,
        }
    )
    document = f"{ISS}/.well-known/openid-configuration"
    answer = {"active": True, "sub": "svc", "scope": "orders:read", "exp": NOW + 600}
    http = FakeHttp({document: IdpUnavailable("down"), f"{ISS}/oauth/introspect": reply(answer)})
    inspector = Introspector("corp", discovered, "s", http, Clock())
    with pytest.raises(IdpUnavailable):
        asyncio.run(inspector.introspect("t0", digest("t0")))
    http.routes[document] = reply({"issuer": ISS, "introspection_endpoint": f"{ISS}/oauth/introspect"})

    async def burst() -> list[Any]:
        return await asyncio.gather(*(inspector.introspect(f"t{i}", digest(f"t{i}")) for i in range(1, 4)))

    assert all(isinstance(r, jwt.Verified) for r in asyncio.run(burst()))
    asyncio.run(inspector.introspect("t4", digest("t4")))
    urls = [url for _, url, _, _ in http.requests]
    assert urls.count(document) == 2  # the failure, then once for all later tokens
    assert urls.count(f"{ISS}/oauth/introspect") == 4
    http.routes[document] = reply({"issuer": "https://evil.example", "introspection_endpoint": "https://evil/x"})
    other = Introspector("corp", discovered, "s", http, Clock())
    with pytest.raises(IdpUnavailable, match=r"names issuer 'https://evil\.example'"):
        asyncio.run(other.introspect("t5", digest("t5")))
    http.routes[document] = reply({"issuer": ISS, "introspection_endpoint": "ftp://idp.example.com/x"})
    with pytest.raises(IdpUnavailable, match="unusable introspection_endpoint"):
        asyncio.run(other.introspect("t6", digest("t6")))
    assert not any(url.startswith(("https://evil", "ftp:")) for _, url, _, _ in http.requests)


@pytest.mark.parametrize(
    "answer", [reply({}, status=500), Reply(200, b"<html>", {}), reply(["active"]), IdpUnavailable("down")]
)
def test_an_idp_that_cannot_answer_is_503_not_401(answer: Reply | Exception) -> None:
    http = FakeHttp({f"{ISS}/introspect": answer})
    tokens = Tokens(GW, Clock(), sources={}, introspectors={"corp": Introspector("corp", CORP, "s", http, Clock())})
    assert asyncio.run(tokens.verify("opaque-token", api("orders"))) is errors.INTROSPECTION_UNAVAILABLE


# --- JWKS: Cache-Control, rate-limited refetch, last known good ---------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "seconds"),
    [
        (None, None),
        ("public, max-age=600", 600.0),
        ('max-age="30"', 30.0),
        ("no-store", 0.0),
        ("private, no-cache, max-age=600", 0.0),
        ("s-maxage=100", None),
        ("max-age=abc", None),
    ],
)
def test_max_age(cache_control: str | None, seconds: float | None) -> None:
    assert jwks.max_age(cache_control) == seconds


@pytest.mark.parametrize(
    ("cache_control", "delay"),
    [(None, 300.0), ("max-age=600", 600.0), ("max-age=5", 60.0), ("max-age=86400", 3600.0), ("no-store", 60.0)],
)
def test_refresh_delay_honours_max_age_within_bounds(cache_control: str | None, delay: float) -> None:
    assert jwks.refresh_delay(cache_control, CORP) == delay


def test_unknown_kid_refetch_is_rate_limited_and_the_last_keys_survive_an_outage() -> None:
    clock = Clock()
    url = f"{ISS}/jwks"
    http = FakeHttp({url: reply({"keys": [KEY.public_jwk]}, cache_control="max-age=600")})
    source = JwksSource("corp", CORP, http, clock)

    async def scenario() -> None:
        await source.fetch()
        assert source.keys is not None
        assert source.keys.kids == ("k1",)
        assert source.next_refresh == 600.0
        # The first unknown kid is fetched at once, however recent the start's fetch was.
        assert await source.refetch() is not None
        assert await source.refetch() is None  # within unknown_kid_refetch (10s) of that refetch
        clock.now += 10
        http.routes[url] = IdpUnavailable("down")
        assert await source.refetch() is None  # tried, failed
        assert source.keys.kids == ("k1",)  # last known good
        assert await source.refetch() is None  # and not tried again at once
        clock.now += 10
        http.routes[url] = reply({"keys": "nonsense"})
        assert await source.refetch() is None
        assert source.keys.kids == ("k1",)

    asyncio.run(scenario())
    assert len(http.requests) == 4


def test_background_refreshes_do_not_delay_the_first_unknown_kid() -> None:
    clock = Clock()
    url = f"{ISS}/jwks"
    http = FakeHttp({url: reply({"keys": [KEY.public_jwk]})})
    source = JwksSource("corp", CORP, http, clock)

    async def scenario() -> list[bool]:
        got = []
        for _ in range(3):
            await source.fetch()  # the start, then background refreshes: none counts
            got.append(await source.refetch() is not None)
            clock.now += 1
        return got

    assert asyncio.run(scenario()) == [True, False, False]  # then one per unknown_kid_refetch
    assert len(http.requests) == 4


def test_discovery_must_name_the_same_issuer() -> None:
    partner = GW.issuers["partner"]
    url = "https://partner.example.com/.well-known/openid-configuration"
    http = FakeHttp({url: reply({"issuer": "https://evil.example.com", "jwks_uri": "https://evil.example.com/k"})})
    source = JwksSource("partner", partner, http, Clock())
    with pytest.raises(IdpUnavailable, match="names issuer"):
        asyncio.run(source.fetch())
    assert [r[1] for r in http.requests] == [url]  # the evil jwks_uri was never fetched


# --- wiring: secrets from the environment -------------------------------------------------------------


def test_build_reads_secrets_from_the_environment_only() -> None:
    with pytest.raises(SettingsError, match="CORP_INTROSPECTION_SECRET is not set"):
        bearer_verifiers(GW, FakeHttp({}), Clock(), {})
    verifiers, sources = bearer_verifiers(GW, FakeHttp({}), Clock(), {"CORP_INTROSPECTION_SECRET": "s"})
    assert sorted(s.name for s in sources) == ["corp", "partner"]
    introspection = next(v for v in verifiers if isinstance(v, IntrospectionVerifier))
    assert set(introspection.introspectors) == {"corp"}


def test_hs_secret_must_be_long_enough() -> None:
    text = with_issuer(
        f"    issuer: {ISS}\n    audiences: [a]\n    algorithms: [HS256]\n    shared_secret_env: CORP_SECRET"
    )
    gateway = config.parse(text)
    with pytest.raises(SettingsError, match="at least 32 bytes"):
        bearer_verifiers(gateway, FakeHttp({}), Clock(), {"CORP_SECRET": "short"})
    verifiers, sources = bearer_verifiers(gateway, FakeHttp({}), Clock(), {"CORP_SECRET": "x" * 32})
    tokens = next(v for v in verifiers if isinstance(v, JwtVerifier))
    assert tokens.secrets == {"corp": b"x" * 32}
    assert sources == []


# --- the compiler: claim headers are identity headers on anonymous routes too -----------------------------


def test_anonymous_routes_strip_every_claim_header() -> None:
    text = GATEWAY + "  - {name: public, match: {prefix: /public}, service: echo, auth: {anonymous: true}}\n"
    gateway = config.parse(text)
    public = next(a for a in gateway.apis if a.name == "public")
    assert public.auth.anonymous
    names, prefixes = gateway.stripped_headers  # the listener's first filter, on every route
    assert "x-partner-org" in names
    assert "x-user-email".startswith(prefixes)
    assert gateway.strips("x-partner-org")
    assert gateway.strips("x-consumer-id")


def test_proxy_style_forwarded_claim_headers_are_allowed_and_stripped_from_clients() -> None:
    text = with_issuer(
        f"    issuer: {ISS}\n    discovery: true\n    audiences: [a]\n"
        "    claims: {email: x-forwarded-email, name: x-forwarded-user, groups: x-forwarded-groups}"
    )
    gateway = config.parse(text)
    assert set(gateway.claim_headers) == {"x-forwarded-email", "x-forwarded-user", "x-forwarded-groups"}
    assert all(gateway.strips(h) for h in gateway.claim_headers)
    assert not gateway.strips("x-forwarded-for")
