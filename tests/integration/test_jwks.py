"""JWKS, discovery and introspection over real HTTP, against the test IdP (``tests.idp``) on loopback.

Each test starts its own IdP (a thread in this process) and runs its coroutine under
``asyncio.run`` with the production ``HttpxClient``. The IdP counts requests per path, so the
tests assert what was fetched — and that forged ``jku``/``x5u`` URLs never were.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from authz import errors
from authz.decision import Identity
from authz.errors import IdpUnavailable
from authz.introspection import Introspector
from authz.jwks import HttpxClient, JwksSource
from sidegate import config
from sidegate.config import Gateway
from tests.idp import RESOURCE_CLIENT, IdP, new_key
from tests.tokens import Tokens

T = TypeVar("T")


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP(max_age=120).start()
    try:
        yield server
    finally:
        server.stop()


def gateway(idp: IdP, jwks: str = "{}", keys: str = "discovery: true") -> Gateway:
    return config.parse(
        f"""
listeners: [{{name: http, port: 8080}}]
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
issuers:
  corp:
    issuer: {idp.issuer}
    {keys}
    audiences: [orders-api]
    typ: at+jwt
    jwks: {jwks}
    introspection:
      endpoint: {idp.url("/introspect")}
      client_id: {RESOURCE_CLIENT[0]}
      client_secret_env: UNUSED_HERE
      cache_ttl: 1s
      timeout: 500ms
apis:
  - name: orders
    match: {{prefix: /orders}}
    service: echo
    auth: {{jwt: [corp]}}
"""
    )


def run(scenario: Callable[[HttpxClient], Awaitable[T]]) -> T:
    async def main() -> T:
        http = HttpxClient()
        try:
            return await asyncio.wait_for(scenario(http), 20)
        finally:
            await http.close()

    return asyncio.run(main())


def source(idp: IdP, http: HttpxClient, **kwargs: Any) -> JwksSource:
    return JwksSource("corp", gateway(idp, **kwargs).issuers["corp"], http, time.monotonic)


def test_discovery_then_jwks_with_cache_control(idp: IdP) -> None:
    async def scenario(http: HttpxClient) -> JwksSource:
        keys = source(idp, http)
        await keys.fetch()
        return keys

    keys = run(scenario)
    assert keys.jwks_uri == idp.url("/jwks")
    assert keys.keys is not None
    assert keys.keys.kids == (idp.active_kid,)
    assert keys.next_refresh == 120.0  # the IdP's max-age, within the default bounds
    assert idp.counts() == {"/.well-known/openid-configuration": 1, "/jwks": 1}


def test_background_refresh_follows_max_age_within_bounds_and_picks_up_rotation(idp: IdP) -> None:
    idp.max_age = 0  # "refetch at once": the min_refresh bound (200ms) holds it back

    async def scenario(http: HttpxClient) -> tuple[int, float, tuple[str | None, ...]]:
        keys = source(idp, http, jwks="{min_refresh: 200ms, refresh: 1s}")
        started = time.monotonic()
        task = asyncio.create_task(keys.run())
        try:
            await asyncio.sleep(0.1)
            new = idp.rotate("ES256")
            while keys.keys is None or new.kid not in keys.keys.kids:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            assert keys.keys is not None
            return keys.fetches, time.monotonic() - started, keys.keys.kids
        finally:
            task.cancel()

    fetches, took, kids = run(scenario)
    assert idp.active_kid in kids
    # At most one fetch per min_refresh (not a busy loop on max-age=0), and more than one.
    assert 2 <= fetches <= took / 0.2 + 1
    assert idp.count("/jwks") == fetches


def test_idp_down_keeps_the_last_keys_and_comes_back(idp: IdP) -> None:
    async def scenario(http: HttpxClient) -> None:
        keys = source(idp, http, jwks="{unknown_kid_refetch: 1ms, timeout: 500ms}")
        first = await keys.fetch()
        idp.stop()
        with pytest.raises(IdpUnavailable, match="ConnectError"):
            await keys.fetch()
        assert keys.keys is first  # last known good
        assert await keys.refetch() is None
        idp.start()  # same port
        rotated = idp.rotate("EdDSA")
        await asyncio.sleep(0.01)
        fresh = await keys.refetch()
        assert fresh is not None
        assert rotated.kid in fresh.kids

    run(scenario)


@pytest.mark.parametrize(
    ("keys_line", "problem"),
    [
        ("jwks_uri: {moved}", "status 302"),  # redirects are not followed
        ("jwks_uri: {missing}", "status 404"),
    ],
)
def test_a_jwks_uri_that_does_not_answer_200_is_not_followed(idp: IdP, keys_line: str, problem: str) -> None:
    line = keys_line.format(moved=idp.url("/moved"), missing=idp.url("/nothing"))

    async def scenario(http: HttpxClient) -> None:
        keys = source(idp, http, keys=line)
        with pytest.raises(IdpUnavailable, match=problem):
            await keys.fetch()
        assert keys.keys is None

    run(scenario)
    assert idp.count("/jwks") == 0


def test_a_slow_idp_times_out(idp: IdP) -> None:
    idp.delay = 2.0

    async def scenario(http: HttpxClient) -> None:
        keys = source(idp, http, jwks="{timeout: 200ms}")
        with pytest.raises(IdpUnavailable, match=r"no answer within 0\.2s"):
            await keys.fetch()

    run(scenario)


def test_an_oversized_answer_is_refused(idp: IdP) -> None:
    async def scenario(http: HttpxClient) -> None:
        small = HttpxClient(max_body=200)
        try:
            keys = source(idp, small)
            with pytest.raises(IdpUnavailable, match="larger than 200 bytes"):
                await keys.fetch()
        finally:
            await small.close()

    run(scenario)


# --- through Bearer: unknown kids, forged key URLs, introspection ---------------------------------------


def bearer(idp: IdP, http: HttpxClient, jwks: str = "{}") -> tuple[Tokens, JwksSource]:
    """A Bearer for the IdP's issuer (wall clock: tokens carry real times), and its key source."""
    gw = gateway(idp, jwks=jwks)
    keys = JwksSource("corp", gw.issuers["corp"], http, time.time)
    inspector = Introspector("corp", gw.issuers["corp"], RESOURCE_CLIENT[1], http, time.time)
    return Tokens(gw, time.time, sources={"corp": keys}, introspectors={"corp": inspector}), keys


def orders(idp: IdP) -> config.Api:
    found = gateway(idp).api("orders")
    assert found is not None
    return found


def test_a_flood_of_unknown_kids_costs_the_idp_one_fetch(idp: IdP) -> None:
    forged = [idp.mint(key=new_key("RS256", kid=f"forged-{i}")) for i in range(3)] * 20

    async def scenario(http: HttpxClient) -> list[Any]:
        tokens, keys = bearer(idp, http, jwks="{unknown_kid_refetch: 1m}")
        await keys.fetch()  # the start's fetch does not count: the first unknown kid refetches at once
        return await asyncio.gather(*(tokens.verify(t, orders(idp)) for t in forged))

    results = run(scenario)
    assert set(results) == {errors.INVALID_TOKEN["kid_unknown"]}
    assert idp.count("/jwks") == 2  # the start, and one refetch for 60 forged tokens


def test_forged_key_urls_are_never_fetched(idp: IdP) -> None:
    attacker = new_key("RS256", kid="attacker")
    jku, x5u = idp.url("/attacker/jwks.json"), idp.url("/attacker/cert.pem")
    forged = [
        idp.mint(key=attacker, jku=jku),
        idp.mint(key=attacker, x5u=x5u),
        idp.mint(key=attacker, jwk=attacker.public_jwk),
        idp.mint(key=attacker, kid=idp.active_kid, jku=jku, x5u=x5u, jwk=attacker.public_jwk),
    ]

    async def scenario(http: HttpxClient) -> list[Any]:
        tokens, keys = bearer(idp, http, jwks="{unknown_kid_refetch: 1ms}")
        await keys.fetch()
        out = []
        for value in forged:
            await asyncio.sleep(0.002)  # let each one trigger its (permitted) refetch
            out.append(await tokens.verify(value, orders(idp)))
        return out

    results = run(scenario)
    assert [r.code for r in results] == ["token_kid_unknown"] * 3 + ["token_signature_invalid"]
    assert not [path for path in idp.counts() if path.startswith("/attacker/")]


def test_opaque_tokens_are_introspected_cached_and_revocable(idp: IdP) -> None:
    idp.register_client("batch-job", "batch-secret", token_format="opaque")
    value = idp.issue("batch-job", "orders:read")

    async def scenario(http: HttpxClient) -> tuple[Any, Any, Any]:
        tokens, _ = bearer(idp, http)
        first = await tokens.verify(value, orders(idp))
        again = await tokens.verify(value, orders(idp))
        idp.revoke(value)
        await asyncio.sleep(1.05)  # cache_ttl
        return first, again, await tokens.verify(value, orders(idp))

    first, again, revoked = run(scenario)
    assert isinstance(first, Identity)
    assert (first.method, first.consumer, first.scopes) == ("introspection", "batch-job", ("orders:read",))
    assert again == first
    assert revoked == errors.INVALID_TOKEN["inactive"]
    assert idp.count("/introspect") == 2


def test_introspection_refused_or_down_is_503(idp: IdP) -> None:
    idp.introspection_status = 500

    async def scenario(http: HttpxClient) -> tuple[Any, Any]:
        tokens, _ = bearer(idp, http)
        refused = await tokens.verify("some-opaque-token", orders(idp))
        idp.stop()
        return refused, await tokens.verify("other-opaque-token", orders(idp))

    assert run(scenario) == (errors.INTROSPECTION_UNAVAILABLE, errors.INTROSPECTION_UNAVAILABLE)
