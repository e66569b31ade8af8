"""API keys without sockets: the key format, the digest, the record, the check, the decision steps
and where a credential is found. Configs are built from gateway.yaml text (``config.parse``)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace

import pytest

from authz import apikeys, credentials, decision, errors
from authz import checker as checker_module
from authz.apikeys import KeyRecord, ParsedKey
from authz.checker import Checker
from authz.credentials import Credential
from authz.decision import CheckInput, Decision, Identity
from authz.keycache import KeyCache
from authz.servicer import to_response
from authz.verifiers.apikey import ApiKeyVerifier, identity_of
from sidegate.config import Api, Gateway, parse
from sidegate.contract import IDENTITY_HEADERS

PEPPER = b"unit-test-pepper"
NOW = 1_700_000_000.0

CONFIG = """
listeners: [{name: http, port: 8080}]
services: {echo: {endpoints: ["127.0.0.1:9000"]}}
apis:
  - name: orders
    match: {prefix: /orders}
    service: echo
    auth:
      api_key: true
      api_key_query: api_key
      scopes: {GET: [orders:read], POST: [orders:write, audit:write], "*": [orders:admin]}
  - name: reports
    match: {prefix: /reports}
    service: echo
    auth: {api_key: true}
  - name: public
    match: {prefix: /public}
    service: echo
    auth: {anonymous: true}
  - name: locked
    match: {prefix: /locked}
    service: echo
"""


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    return parse(CONFIG)


def api(gateway: Gateway, name: str) -> Api:
    found = gateway.api(name)
    assert found is not None
    return found


def make_key(environment: str = "live") -> tuple[str, str]:
    return apikeys.new_key("sg", environment)


def record_for(key_id: str, key: str, **fields: object) -> KeyRecord:
    values: dict[str, object] = {"consumer": "acme", "scopes": ("orders:read",), "created_at": NOW - 10}
    values.update(fields)
    return KeyRecord(key_id=key_id, digest=apikeys.digest(PEPPER, key), **values)  # type: ignore[arg-type]


# --- the key format ------------------------------------------------------------------------

KEY_SHAPE = re.compile(r"^sg_live_([a-z2-7]+)_([a-z2-7]+)$")


def test_new_key_reads_prefix_environment_id_secret() -> None:
    key_id, key = make_key()
    shape = KEY_SHAPE.match(key)
    assert shape is not None, key
    assert shape.group(1) == key_id
    secret = shape.group(2)
    assert len(secret) * 5 >= 128  # base32: 5 bits a character
    assert apikeys.parse(key) == ParsedKey("sg", "live", key_id, secret)


def test_new_keys_and_ids_do_not_repeat() -> None:
    issued = [make_key() for _ in range(200)]
    assert len({key_id for key_id, _ in issued}) == 200
    assert len({key.rsplit("_", 1)[1] for _, key in issued}) == 200


def test_new_key_takes_the_configured_prefix_and_environment() -> None:
    key_id, key = apikeys.new_key("acme", "test")
    assert key.startswith(f"acme_test_{key_id}_")
    assert apikeys.parse(key) is not None


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "not-a-key",
        "sg_live_abcdef",  # three parts
        "sg_live_abc_def_ghi",  # five parts
        "sg_live__secret",  # empty id
        "sg_live_abc_",  # empty secret
        "sg_live_ABC_def",  # upper case
        "sg_live_abc1_def",  # 1 is not base32
        "sg_live_abc_de=f",  # no padding
        "sg_live_abc_dé",
        "sg live abc def",
        "sg_live_" + "a" * 16 + "_" + "b" * 500,  # over-long
    ],
)
def test_parse_refuses_what_is_not_shaped_like_a_key(presented: str) -> None:
    assert apikeys.parse(presented) is None


def test_parse_limits_the_length_to_200() -> None:
    head = "sg_live_" + "a" * 16 + "_"
    assert apikeys.parse(head + "b" * (200 - len(head))) is not None
    assert apikeys.parse(head + "b" * (201 - len(head))) is None


@pytest.mark.parametrize("presented", ["sg_live_abc\n_def", "sg_live_abc_def\n"])
def test_parse_refuses_a_newline_inside_a_part(presented: str) -> None:
    assert apikeys.parse(presented) is None


def test_digest_is_keyed_by_the_pepper() -> None:
    _, key = make_key()
    value = apikeys.digest(PEPPER, key)
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    assert value == apikeys.digest(PEPPER, key)
    assert value != apikeys.digest(b"another-pepper", key)
    assert value != apikeys.digest(PEPPER, key + "a")
    assert key not in value


# --- the check of one key ------------------------------------------------------------------


def verdict(presented: str, record: KeyRecord | None, *, pepper: bytes = PEPPER, now: float = NOW) -> str:
    return apikeys.check(
        presented, apikeys.parse(presented), record, pepper=pepper, prefix="sg", environment="live", now=now
    )


def test_check_accepts_the_right_key() -> None:
    key_id, key = make_key()
    assert verdict(key, record_for(key_id, key)) == apikeys.OK


def test_check_refuses_a_malformed_key_or_another_prefix() -> None:
    key_id, key = make_key()
    assert verdict("garbage", record_for(key_id, key)) == apikeys.MALFORMED
    other_id, other = apikeys.new_key("xx", "live")
    assert verdict(other, record_for(other_id, other)) == apikeys.MALFORMED


def test_check_refuses_another_environment_even_with_its_record() -> None:
    key_id, key = make_key("test")
    assert verdict(key, record_for(key_id, key)) == apikeys.WRONG_ENVIRONMENT


def test_check_refuses_a_wrong_secret_a_missing_record_and_another_pepper() -> None:
    key_id, key = make_key()
    record = record_for(key_id, key)
    forged = key[:-1] + ("a" if key[-1] != "a" else "b")
    assert apikeys.parse(forged) is not None
    assert verdict(forged, record) == apikeys.UNKNOWN
    assert verdict(key, None) == apikeys.UNKNOWN
    assert verdict(key, record, pepper=b"another-pepper") == apikeys.UNKNOWN


def test_check_refuses_a_revoked_key_before_looking_at_expiry() -> None:
    key_id, key = make_key()
    assert verdict(key, record_for(key_id, key, revoked=True)) == apikeys.REVOKED
    assert verdict(key, record_for(key_id, key, revoked=True, expires_at=NOW - 1)) == apikeys.REVOKED


def test_check_expires_exactly_at_expires_at() -> None:
    key_id, key = make_key()
    record = record_for(key_id, key, expires_at=NOW)
    assert verdict(key, record, now=NOW - 0.001) == apikeys.OK
    assert verdict(key, record, now=NOW) == apikeys.EXPIRED
    assert verdict(key, record, now=NOW + 3600) == apikeys.EXPIRED


# --- the record ----------------------------------------------------------------------------


def full_record() -> KeyRecord:
    return KeyRecord(
        key_id="abc",
        digest="d" * 64,
        consumer="acme",
        scopes=("orders:read", "orders:write"),
        plan="gold",
        version="v2",
        expires_at=NOW + 100,
        created_at=NOW - 100,
        created_by="alice",
        rotated_at=NOW - 50,
        rotated_by="bob",
        successor="def",
        last_used_at=NOW - 1,
    )


def test_record_status() -> None:
    record = full_record()
    assert record.status(NOW) == apikeys.ACTIVE
    assert record.status(NOW + 100) == apikeys.EXPIRED
    assert replace(record, expires_at=None).status(NOW + 10**9) == apikeys.ACTIVE
    assert replace(record, revoked=True).status(NOW) == apikeys.REVOKED


def test_record_round_trips_through_a_json_dict() -> None:
    record = full_record()
    data = record.to_dict()
    assert data["scopes"] == ["orders:read", "orders:write"]
    assert data["digest"] == "d" * 64
    assert KeyRecord.from_dict(json.loads(json.dumps(data))) == record


def test_record_from_dict_ignores_unknown_fields_and_defaults_scopes() -> None:
    record = KeyRecord.from_dict({"key_id": "a", "digest": "0" * 64, "consumer": "c", "scopes": None, "new": 1})
    assert record == KeyRecord(key_id="a", digest="0" * 64, consumer="c")
    with pytest.raises(TypeError):
        KeyRecord.from_dict({"key_id": "a", "consumer": "c"})  # no digest


def test_public_record_has_no_digest_and_the_effective_status() -> None:
    record = full_record()
    shown = record.public(NOW + 200)
    assert "digest" not in shown
    assert "d" * 64 not in json.dumps(shown)
    assert shown["status"] == apikeys.EXPIRED
    assert shown["key_id"] == "abc"
    assert shown["scopes"] == ["orders:read", "orders:write"]
    assert record.public(NOW)["status"] == apikeys.ACTIVE


# --- where the credential is found -------------------------------------------------------


def find(gateway: Gateway, name: str, headers: dict[str, str], path: str = "/x") -> Credential | None:
    return credentials.find(headers, path, api(gateway, name).auth, gateway.api_keys)


def test_credential_from_x_api_key_trimmed(gateway: Gateway) -> None:
    assert find(gateway, "orders", {"x-api-key": "  k1 "}) == Credential("api_key", "k1", header="x-api-key")


def test_credential_from_authorization_apikey_scheme(gateway: Gateway) -> None:
    for value in ("ApiKey k2", "apikey  k2 ", "APIKEY k2"):
        found = find(gateway, "orders", {"authorization": value})
        assert found == Credential("api_key", "k2", header="authorization"), value
    assert find(gateway, "orders", {"authorization": "Bearer k2"}) is None
    assert find(gateway, "orders", {"authorization": "ApiKey   "}) is None
    assert find(gateway, "orders", {"authorization": "ApiKeyk2"}) is None


def test_header_wins_over_authorization(gateway: Gateway) -> None:
    found = find(gateway, "orders", {"x-api-key": "k1", "authorization": "ApiKey k2"})
    assert found == Credential("api_key", "k1", header="x-api-key")


def test_blank_header_falls_through(gateway: Gateway) -> None:
    found = find(gateway, "orders", {"x-api-key": "   ", "authorization": "ApiKey k2"})
    assert found == Credential("api_key", "k2", header="authorization")
    assert find(gateway, "orders", {"x-api-key": ""}) is None


def test_query_parameter_only_where_the_api_names_one(gateway: Gateway) -> None:
    path = "/orders/1?page=2&api_key=k3"
    assert find(gateway, "orders", {}, path) == Credential("api_key", "k3", query="api_key")
    assert find(gateway, "reports", {}, "/reports?api_key=k3") is None
    assert find(gateway, "orders", {}, "/orders?api_key=") is None  # blank
    assert find(gateway, "orders", {}, "/orders?other=k3") is None
    assert find(gateway, "orders", {"x-api-key": "k1"}, path) == Credential("api_key", "k1", header="x-api-key")


def test_no_credential_for_apis_without_api_keys(gateway: Gateway) -> None:
    assert find(gateway, "locked", {"x-api-key": "k1", "authorization": "ApiKey k1"}) is None
    assert find(gateway, "public", {"x-api-key": "k1"}) is None


def test_configurable_header_replaces_x_api_key() -> None:
    custom = parse(CONFIG + "api_keys: {header: x-gateway-key}\n")
    auth = api(custom, "orders").auth
    found = credentials.find({"x-gateway-key": "k4"}, "/", auth, custom.api_keys)
    assert found == Credential("api_key", "k4", header="x-gateway-key")
    assert credentials.find({"x-api-key": "k4"}, "/", auth, custom.api_keys) is None


# --- the decision steps --------------------------------------------------------------------


def check_input(method: str = "GET", path: str = "/orders/1", headers: dict[str, str] | None = None) -> CheckInput:
    return CheckInput(api="orders", method=method, path=path, headers=headers or {})


def body(result: Decision) -> dict[str, str]:
    data = json.loads(result.body)
    assert isinstance(data, dict)
    return data


def headers(result: Decision) -> dict[str, str]:
    out = dict(result.headers)
    assert len(out) == len(result.headers), "a header set twice"
    return out


def test_denials_are_pinned() -> None:
    table = {(d.http_status, d.error, d.code, d.message) for d in errors.INVALID_API_KEY.values()}
    assert table == {
        (401, "invalid_api_key", "api_key_missing", "an API key is required"),
        (401, "invalid_api_key", "api_key_malformed", "the API key is not well formed"),
        (401, "invalid_api_key", "api_key_wrong_environment", "the API key belongs to another environment"),
        (401, "invalid_api_key", "api_key_unknown", "the API key is not known"),
        (401, "invalid_api_key", "api_key_revoked", "the API key has been revoked"),
        (401, "invalid_api_key", "api_key_expired", "the API key has expired"),
    }
    # every verdict of apikeys.check but "ok" has its denial
    verdicts = {apikeys.MALFORMED, apikeys.WRONG_ENVIRONMENT, apikeys.UNKNOWN, apikeys.REVOKED, apikeys.EXPIRED}
    assert verdicts | {"missing"} == set(errors.INVALID_API_KEY)
    missing = errors.MISSING_CREDENTIALS
    assert (missing.http_status, missing.error, missing.code, missing.message) == (
        401,
        "missing_credentials",
        "missing_credentials",
        "this API requires credentials",
    )
    assert (errors.UNKNOWN_API.http_status, errors.UNKNOWN_API.code) == (403, "unknown_api")
    assert (errors.INSUFFICIENT_SCOPE.http_status, errors.INSUFFICIENT_SCOPE.code) == (403, "insufficient_scope")
    assert (errors.KEY_STORE_UNAVAILABLE.http_status, errors.KEY_STORE_UNAVAILABLE.error) == (
        503,
        "temporarily_unavailable",
    )


def test_route_unknown_api_is_403_without_a_challenge() -> None:
    result = decision.route(check_input(), None)
    assert result is not None
    assert (result.allowed, result.status, result.code) == (False, 403, "unknown_api")
    assert headers(result) == {"content-type": "application/json"}
    assert body(result) == {
        "error": "unknown_api",
        "reason": "unknown_api",
        "message": "no authorization policy for this route",
    }


def test_route_anonymous_allows_and_strips_identity_headers(gateway: Gateway) -> None:
    result = decision.route(check_input(), api(gateway, "public"))
    assert result is not None
    assert result.allowed
    assert headers(result) == {"x-auth-method": "anonymous"}
    assert set(result.remove) == set(IDENTITY_HEADERS) - {"x-auth-method"}
    assert result.metadata["consumer"] == "anonymous"


def test_route_leaves_credentialed_apis_to_the_next_steps(gateway: Gateway) -> None:
    assert decision.route(check_input(), api(gateway, "orders")) is None
    assert decision.route(check_input(), api(gateway, "locked")) is None


def test_missing_key_is_401_with_a_challenge_without_error(gateway: Gateway) -> None:
    result = decision.missing(api(gateway, "orders"))
    assert (result.allowed, result.status, result.code) == (False, 401, "api_key_missing")
    assert headers(result) == {"content-type": "application/json", "www-authenticate": 'ApiKey realm="sidegate"'}
    assert body(result) == {
        "error": "invalid_api_key",
        "reason": "api_key_missing",
        "message": "an API key is required",
    }


def test_missing_credentials_on_an_api_without_api_keys(gateway: Gateway) -> None:
    result = decision.missing(api(gateway, "locked"))
    assert (result.status, result.code) == (401, "missing_credentials")
    assert headers(result)["www-authenticate"] == 'Bearer realm="sidegate"'
    assert body(result)["error"] == "missing_credentials"


@pytest.mark.parametrize("reason", ["malformed", "wrong_environment", "unknown", "revoked", "expired"])
def test_invalid_key_denials_name_the_error_in_the_challenge(gateway: Gateway, reason: str) -> None:
    denial = errors.INVALID_API_KEY[reason]
    result = decision.deny(denial, api(gateway, "orders"))
    assert (result.allowed, result.status, result.code) == (False, 401, f"api_key_{reason}")
    assert headers(result) == {
        "content-type": "application/json",
        "www-authenticate": 'ApiKey realm="sidegate", error="invalid_api_key"',
    }
    assert body(result) == {"error": "invalid_api_key", "reason": f"api_key_{reason}", "message": denial.message}
    assert result.body.endswith("\n")
    assert result.identity is None
    assert not result.metadata


def test_store_unavailable_is_503_without_a_challenge(gateway: Gateway) -> None:
    result = decision.deny(errors.KEY_STORE_UNAVAILABLE, api(gateway, "orders"))
    assert (result.allowed, result.status) == (False, 503)
    assert "www-authenticate" not in headers(result)
    assert body(result)["reason"] == "key_store_unavailable"


def authenticate(record: KeyRecord | None, key: str, gateway: Gateway, now: float = NOW) -> Identity | errors.Denial:
    """The API-key verifier's answer for ``key`` when the store holds ``record``."""
    store = DictStore()
    if record is not None:
        store.records[record.key_id] = record
    cache = KeyCache(store, lambda: now, ttl=60, negative_ttl=5)  # type: ignore[arg-type]
    verifier = ApiKeyVerifier(cache, PEPPER, gateway.api_keys, lambda: now)
    credential = Credential("api_key", key, header="x-api-key")
    return asyncio.run(verifier.verify(credential, api(gateway, "orders")))


def test_an_accepted_key_gives_the_identity_of_its_record(gateway: Gateway) -> None:
    key_id, key = make_key()
    record = record_for(key_id, key, plan="gold", version="v2", scopes=("orders:read", "x:y"))
    assert authenticate(record, key, gateway) == Identity(
        "api_key", "acme", ("orders:read", "x:y"), "gold", key_id, "v2"
    )


def test_a_refused_key_is_denied_with_the_reason(gateway: Gateway) -> None:
    key_id, key = make_key()
    assert authenticate(record_for(key_id, key, revoked=True), key, gateway) is errors.INVALID_API_KEY["revoked"]
    expiring = record_for(key_id, key, expires_at=NOW)
    assert authenticate(expiring, key, gateway) is errors.INVALID_API_KEY["expired"]
    assert authenticate(None, key, gateway) is errors.INVALID_API_KEY["unknown"]
    assert authenticate(None, "nope", gateway) is errors.INVALID_API_KEY["malformed"]
    test_id, test_key = make_key("test")
    assert authenticate(record_for(test_id, test_key), test_key, gateway) is errors.INVALID_API_KEY["wrong_environment"]


def identity(*scopes: str, plan: str | None = None, version: str | None = None) -> Identity:
    return Identity("api_key", "acme", scopes, plan, "kid", version)


HEADER_CREDENTIAL = Credential("api_key", "sg_live_a_b", header="x-api-key")


@pytest.mark.parametrize(
    ("method", "held", "lacking"),
    [
        ("GET", (), "orders:read"),
        ("GET", ("orders:write",), "orders:read"),
        ("POST", ("orders:write",), "audit:write"),
        ("POST", (), "orders:write audit:write"),
        ("DELETE", ("orders:read", "orders:write"), "orders:admin"),  # "*" covers other methods
        ("PATCH", (), "orders:admin"),
    ],
)
def test_authorize_names_the_missing_scopes(gateway: Gateway, method: str, held: tuple[str, ...], lacking: str) -> None:
    result = decision.authorize(api(gateway, "orders"), check_input(method), identity(*held), HEADER_CREDENTIAL)
    assert (result.allowed, result.status, result.code) == (False, 403, "insufficient_scope")
    assert body(result) == {
        "error": "insufficient_scope",
        "reason": "insufficient_scope",
        "message": "the credential lacks a required scope",
        "scope": lacking,
    }
    assert headers(result)["www-authenticate"] == (
        f'ApiKey realm="sidegate", error="insufficient_scope", scope="{lacking}"'
    )


@pytest.mark.parametrize(
    ("method", "held"),
    [("GET", ("orders:read",)), ("POST", ("audit:write", "orders:write")), ("PUT", ("orders:admin",))],
)
def test_authorize_allows_with_the_scopes_of_the_method(gateway: Gateway, method: str, held: tuple[str, ...]) -> None:
    result = decision.authorize(api(gateway, "orders"), check_input(method), identity(*held), HEADER_CREDENTIAL)
    assert result.allowed, result.body


def test_an_api_without_scopes_needs_only_a_valid_key(gateway: Gateway) -> None:
    result = decision.authorize(api(gateway, "reports"), check_input("DELETE"), identity(), HEADER_CREDENTIAL)
    assert result.allowed


def test_allow_sets_identity_headers_and_removes_forgeries_and_the_key(gateway: Gateway) -> None:
    who = identity("orders:read", "orders:write", plan="gold")
    result = decision.authorize(api(gateway, "orders"), check_input(), who, HEADER_CREDENTIAL)
    assert (result.allowed, result.status, result.code) == (True, 200, "ok")
    assert headers(result) == {
        "x-consumer-id": "acme",
        "x-consumer-plan": "gold",
        "x-auth-method": "api_key",
        "x-auth-scopes": "orders:read orders:write",
        "x-auth-key-id": "kid",
    }
    # identity headers authz sets overwrite the client's; every other one is removed, and the key
    assert set(result.remove) == (set(IDENTITY_HEADERS) - set(headers(result))) | {"x-api-key"}
    assert result.remove_query == ()
    assert dict(result.metadata) == {
        "consumer": "acme",
        "plan": "gold",
        "auth_method": "api_key",
        "key_id": "kid",
        "version": "",
    }
    assert result.identity == who
    assert result.body == ""


def test_allow_carries_the_pinned_version_in_metadata(gateway: Gateway) -> None:
    who = identity("orders:read", version="v2")
    result = decision.authorize(api(gateway, "orders"), check_input(), who, HEADER_CREDENTIAL)
    assert result.metadata["version"] == "v2"
    assert result.metadata["plan"] == "none"


def test_allow_without_plan_removes_a_forged_plan_and_defaults_metadata(gateway: Gateway) -> None:
    result = decision.authorize(api(gateway, "orders"), check_input(), identity("orders:read"), HEADER_CREDENTIAL)
    assert "x-consumer-plan" not in headers(result)
    assert "x-consumer-plan" in result.remove
    # what is set is never removed: Envoy would drop the value authz just gave
    assert not set(result.remove) & set(headers(result))
    assert set(result.remove) | set(headers(result)) >= set(IDENTITY_HEADERS)
    assert result.metadata["plan"] == "none"


def test_allow_removes_an_authorization_credential(gateway: Gateway) -> None:
    credential = Credential("api_key", "k", header="authorization")
    result = decision.authorize(api(gateway, "orders"), check_input(), identity("orders:read"), credential)
    assert "authorization" in result.remove
    assert "x-api-key" not in result.remove


def test_allow_removes_a_query_credential(gateway: Gateway) -> None:
    credential = Credential("api_key", "k", query="api_key")
    result = decision.authorize(api(gateway, "orders"), check_input(), identity("orders:read"), credential)
    assert result.remove_query == ("api_key",)
    assert "x-api-key" not in result.remove
    assert "authorization" not in result.remove


@pytest.mark.parametrize(
    ("request_headers", "path"),
    [
        ({"x-api-key": "KEY", "authorization": "ApiKey KEY"}, "/orders/1"),
        ({"x-api-key": "KEY"}, "/orders/1?api_key=KEY"),
    ],
)
def test_every_copy_of_a_presented_key_is_stripped(
    gateway: Gateway, request_headers: dict[str, str], path: str
) -> None:
    orders = api(gateway, "orders")
    check = check_input(path=path, headers=request_headers)
    credential = credentials.find(check.headers, check.path, orders.auth, gateway.api_keys)
    assert credential is not None
    result = decision.authorize(orders, check, identity("orders:read"), credential)
    assert result.allowed
    assert "x-api-key" in result.remove
    if "authorization" in request_headers:
        assert "authorization" in result.remove
    if "?" in path:
        assert "api_key" in result.remove_query


# --- the CheckResponse of an allowed decision ----------------------------------------------


def test_allowed_responses_are_built_once_and_per_request_fields_never_leak_into_them() -> None:
    allowed = Decision(True, headers=(("x-consumer-id", "ada"),), remove=("x-api-key",), metadata={"consumer": "ada"})
    first, again = to_response(allowed), to_response(replace(allowed))
    assert first is again  # the same answer for the same consumer and API: built once
    limited = to_response(replace(allowed, response_headers=(("ratelimit", '"p";r=9;t=60'),)))
    assert limited is not first
    assert [(h.header.key, h.header.value) for h in limited.ok_response.response_headers_to_add] == [
        ("ratelimit", '"p";r=9;t=60')
    ]
    assert [h.header.key for h in limited.ok_response.headers] == ["x-consumer-id"]
    assert limited.dynamic_metadata["consumer"] == "ada"
    assert not to_response(allowed).ok_response.response_headers_to_add  # the shared one is untouched
    other = to_response(replace(allowed, headers=(("x-consumer-id", "bob"),), metadata={"consumer": "bob"}))
    assert other.ok_response.headers[0].header.value == "bob"


# --- the servicer's memo of key decisions --------------------------------------------------


class DictStore:
    """Just enough of a key store for KeyCache.get: records by id."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}

    async def get(self, key_id: str) -> KeyRecord | None:
        return self.records.get(key_id)


def servicer_over(gateway: Gateway, store: DictStore) -> Checker:
    cache = KeyCache(store, lambda: NOW, ttl=60, negative_ttl=5)  # type: ignore[arg-type]
    return Checker(gateway, [ApiKeyVerifier(cache, PEPPER, gateway.api_keys, lambda: NOW)], lambda: NOW)


def key_cache(checker: Checker) -> KeyCache:
    verifier = checker.verifiers["api_key"]
    assert isinstance(verifier, ApiKeyVerifier)
    return verifier.keys


def test_key_decisions_are_built_once_and_follow_the_record_the_gateway_and_the_request() -> None:
    asyncio.run(asyncio.wait_for(key_decisions(), 10))


async def key_decisions() -> None:
    gateway, store = parse(CONFIG), DictStore()
    key_id, key = make_key()
    store.records[key_id] = record_for(key_id, key, plan="gold")
    servicer = servicer_over(gateway, store)
    get = check_input(headers={"x-api-key": key})
    first = await servicer.check(get)
    assert first.allowed
    assert headers(first)["x-consumer-plan"] == "gold"
    assert await servicer.check(check_input(headers={"x-api-key": key})) is first  # remembered
    credential = credentials.find(get.headers, get.path, api(gateway, "orders").auth, gateway.api_keys)
    assert credential is not None
    fresh = decision.authorize(api(gateway, "orders"), get, identity_of(store.records[key_id]), credential)
    assert first == fresh  # what it remembers is what it would build

    # the same key elsewhere in the request: another shape, another decision
    twice = await servicer.check(check_input(headers={"x-api-key": key, "authorization": f"ApiKey {key}"}))
    assert "authorization" in twice.remove
    assert "authorization" not in first.remove
    assert (await servicer.check(check_input("POST", headers={"x-api-key": key}))).status == 403

    # a changed record (its change reaches the cache): the new scopes and plan count
    store.records[key_id] = record_for(key_id, key, plan="silver", scopes=("orders:admin",))
    key_cache(servicer).invalidate({key_id})
    changed = await servicer.check(get)
    assert changed.status == 403  # GET needs orders:read, which the record no longer holds

    # a reloaded gateway: its scopes count
    servicer.reload(parse(CONFIG.replace("GET: [orders:read]", "GET: [orders:admin]")))
    reloaded = await servicer.check(get)
    assert reloaded.allowed
    assert headers(reloaded)["x-consumer-plan"] == "silver"

    # a revoked key is refused although an allow for it is remembered
    store.records[key_id] = replace(store.records[key_id], revoked=True)
    key_cache(servicer).invalidate({key_id})
    assert (await servicer.check(get)).code == "api_key_revoked"
    # and a wrong secret with the same id is refused too
    forged = f"sg_live_{key_id}_{'a' * 32}"
    store.records[key_id] = replace(store.records[key_id], revoked=False)
    key_cache(servicer).invalidate({key_id})
    assert (await servicer.check(get)).allowed
    assert (await servicer.check(check_input(headers={"x-api-key": forged}))).code == "api_key_unknown"


def test_the_memo_of_key_decisions_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checker_module, "DECISIONS", 2)

    async def scenario() -> None:
        gateway, store = parse(CONFIG), DictStore()
        servicer = servicer_over(gateway, store)
        keys = [make_key() for _ in range(5)]
        for n, (key_id, key) in enumerate(keys):
            store.records[key_id] = record_for(key_id, key, consumer=f"c{n}")
        for _ in range(2):
            for n, (_, key) in enumerate(keys):
                result = await servicer.check(check_input(headers={"x-api-key": key}))
                assert headers(result)["x-consumer-id"] == f"c{n}"
                assert len(servicer.decisions) <= 2

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_keys_in_the_query_are_found_by_their_shape_whatever_the_parameter() -> None:
    key = "sg_live_" + "a" * 16 + "_" + "b" * 32
    other_env = "sg_test_" + "c" * 16 + "_" + "d" * 32
    path = f"/orders?token={key}&page=2&x={other_env}&short=sg_live_abc_def&foreign=zz_live_{'a' * 16}_{'b' * 32}"
    assert credentials.keys_in_query(path, "sg") == ("token", "x")
    assert credentials.keys_in_query("/orders?page=2", "sg") == ()
    assert credentials.keys_in_query("/orders/sg_live_x", "sg") == ()
