"""Rate limits through real Envoy, with counters in memory (``sidegate up``'s default) and in
Redis: 429 with Retry-After, the RateLimit fields and a JSON body; limits keyed by the consumer
authz found (API keys in the stack's own key store)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from authz.keyservice import KeyService
from authz.keystore import open_store
from tests.conftest import RedisServer
from tests.e2e.conftest import Gateway, new_gateway, start

TEMPLATE = Path(__file__).with_name("ratelimit_gateway.yaml")
RATELIMIT_CALLS = "cluster.sidegate_ratelimit.upstream_rq_total"
AUTHZ_CALLS = "cluster.sidegate_authz.upstream_rq_total"


def in_authz(gateway: Gateway) -> bool:
    return gateway.stack.gateway.ratelimit.in_authz


def limit_calls(gateway: Gateway) -> int:
    """Callouts that take a rate-limit decision: to the ratelimit service, or to authz when it limits."""
    return gateway.stat(AUTHZ_CALLS if in_authz(gateway) else RATELIMIT_CALLS)


@pytest.fixture(scope="module", params=["memory", "redis", "in_authz"])
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The stack of ratelimit_gateway.yaml, counting in memory or in a Redis of its own, or
    decided by authz itself (``ratelimit.in_authz``: one callout per request)."""
    workdir = tmp_path_factory.mktemp(f"ratelimit-{request.param}")
    redis_server = None
    template = TEMPLATE
    if request.param == "in_authz":
        template = workdir / "template.yaml"
        template.write_text(TEMPLATE.read_text().replace("ratelimit:\n", "ratelimit:\n  in_authz: true\n", 1))
    running = new_gateway(workdir, template=template)
    try:
        if request.param == "redis":
            redis_server = RedisServer(workdir)
            redis_server.start()
            running.stack.settings = replace(running.stack.settings, redis_url=redis_server.url)
        start(running.stack)
        yield running
    finally:
        running.stack.stop()
        if redis_server is not None:
            redis_server.stop()


@pytest.fixture(scope="module")
def client(limited: Gateway) -> Iterator[httpx.Client]:
    with limited.https() as https:
        yield https


def new_key(gateway: Gateway, consumer: str, plan: str | None = None) -> str:
    """An API key in the stack's key store (SQLite, or Redis when the stack has one)."""
    settings = gateway.stack.settings

    async def create() -> str:
        store = open_store(settings.redis_url, settings.state_dir)
        try:
            service = KeyService(store, settings.pepper(), gateway.stack.gateway.api_keys, time.time)
            issued = await service.create(consumer=consumer, scopes=[], actor="e2e", plan=plan)
            return issued.key
        finally:
            await store.close()

    return asyncio.run(create())


def test_per_ip_limit_answers_429_with_retry_after_ratelimit_fields_and_json(
    limited: Gateway, client: httpx.Client
) -> None:
    replies = [client.get(f"/public/{i}") for i in range(6)]
    assert [r.status_code for r in replies] == [200] * 5 + [429]
    first, last_ok, refused = replies[0], replies[4], replies[5]
    # 5 per hour as a token bucket: one token every 720 s.
    assert first.headers["ratelimit-policy"] == '"public-ip-1h";q=5;w=3600'
    assert first.headers["ratelimit"] == '"public-ip-1h";r=4;t=720'
    assert first.json()["path"] == "/public/0"  # the upstream answered
    assert last_ok.headers["ratelimit"] == '"public-ip-1h";r=0;t=3600'
    assert refused.headers["ratelimit-policy"] == '"public-ip-1h";q=5;w=3600'
    assert refused.headers["ratelimit"] == '"public-ip-1h";r=0;t=3600'
    assert 715 <= int(refused.headers["retry-after"]) <= 720
    assert refused.headers["content-type"] == "application/json"
    if not in_authz(limited):  # Envoy's ratelimit filter marks its own refusals
        assert refused.headers["x-envoy-ratelimited"] == "true"
    body = refused.json()
    assert body["error"] == "rate_limited"
    assert body["policies"] == ["public-ip-1h"]
    assert body["retry_after"] == int(refused.headers["retry-after"])


def test_routes_without_limits_make_no_rate_limit_call(limited: Gateway, client: httpx.Client) -> None:
    before = limit_calls(limited)
    for _ in range(10):
        reply = client.get("/open/x")
        assert reply.status_code == 200
        assert "ratelimit" not in reply.headers
    assert limit_calls(limited) == before
    client.get("/public/x")
    assert limit_calls(limited) == before + 1


def test_callouts_per_request_two_or_one_with_in_authz(limited: Gateway, client: httpx.Client) -> None:
    key = new_key(limited, "dave", plan="gold")
    authz, ratelimit = limited.stat(AUTHZ_CALLS), limited.stat(RATELIMIT_CALLS)
    replies = [client.get("/orders/1", headers={"x-api-key": key}) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert limited.stat(AUTHZ_CALLS) == authz + 4
    assert limited.stat(RATELIMIT_CALLS) == (0 if in_authz(limited) else ratelimit + 4)


def test_plan_limits_are_keyed_by_the_consumer_authz_found(limited: Gateway, client: httpx.Client) -> None:
    alice, bob = new_key(limited, "alice", plan="gold"), new_key(limited, "bob", plan="gold")
    alice_replies = [client.get("/orders/1", headers={"x-api-key": alice}) for _ in range(4)]
    assert [r.status_code for r in alice_replies] == [200, 200, 200, 429]
    assert alice_replies[0].headers["ratelimit-policy"] == '"gold-1h";q=3;w=3600'
    assert alice_replies[0].headers["ratelimit"] == '"gold-1h";r=2;t=1200'
    assert alice_replies[0].json()["headers"]["x-consumer-id"] == "alice"
    assert alice_replies[3].json()["policies"] == ["gold-1h"]
    # Bob has a budget of his own; and a second key of Alice's shares hers.
    assert client.get("/orders/1", headers={"x-api-key": bob}).status_code == 200
    alice_again = new_key(limited, "alice", plan="gold")
    assert client.get("/orders/1", headers={"x-api-key": alice_again}).status_code == 429


def test_method_scoped_api_limit_per_consumer(limited: Gateway, client: httpx.Client) -> None:
    carol = new_key(limited, "carol")  # no plan: only the API's POST limit applies
    headers = {"x-api-key": carol}
    posts = [client.post("/orders", headers=headers, content=b"{}") for _ in range(5)]
    assert [r.status_code for r in posts] == [200] * 4 + [429]
    assert posts[0].headers["ratelimit-policy"] == '"orders-consumer-1h";q=4;w=3600'
    gets = [client.get("/orders/1", headers=headers) for _ in range(6)]
    assert [r.status_code for r in gets] == [200] * 6
    assert "ratelimit" not in gets[0].headers


def test_without_credentials_authz_answers_before_any_rate_limit(limited: Gateway, client: httpx.Client) -> None:
    before = limited.stat(RATELIMIT_CALLS)
    for _ in range(5):
        assert client.get("/orders/1").status_code == 401
    assert limited.stat(RATELIMIT_CALLS) == before
