"""How many ext_authz ``Check`` calls one authz worker answers for bearer JWTs, and the CPU each costs.

    .venv/bin/python -m bench.jwt_bench [--iterations N]

In-process: the real ``Authorization`` servicer with a real ``Bearer`` (issuer keys held in
memory, as after a JWKS fetch: no HTTP while measuring), awaited directly on pre-built
``CheckRequest`` protos; CPU from ``time.process_time`` (denials are logged as in the server, as
JSON lines, to /dev/null). The headline is the first row: a valid token already in the
verified-token cache — SHA-256 of the token, one dict lookup, one ``exp`` comparison, then the
scopes, headers and response proto. The "uncached" rows empty the cache before every call, so
they pay the full validation (parse, JSON, signature, claims) for each algorithm.
Loopback-free, bounded (a few seconds with the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from envoy.service.auth.v3 import external_auth_pb2

from authz import jwt
from authz.checker import Checker
from authz.jwt import KeySet
from authz.keycache import KeyCache
from authz.keystore import SqliteKeyStore
from authz.servicer import Authorization
from authz.verifiers.apikey import ApiKeyVerifier
from authz.verifiers.jwt import JwtVerifier
from bench.authz_bench import Row, table
from sidegate import config, logs

ISSUER = "https://idp.example.com"
CONFIG = f"""
listeners: [{{name: http, port: 8080}}]
services: {{echo: {{endpoints: ["127.0.0.1:9000"]}}}}
issuers:
  corp:
    issuer: {ISSUER}
    jwks_uri: {ISSUER}/jwks
    audiences: [orders-api]
    algorithms: [RS256, ES256, EdDSA]
    typ: at+jwt
    plan_claim: plan
    claims: {{email: x-user-email}}
apis:
  - name: orders
    match: {{prefix: /orders}}
    service: echo
    auth: {{jwt: [corp], scopes: {{GET: [orders:read], POST: [orders:write]}}}}
"""


class Keys:
    """The issuer's keys, as a JwksSource holds them after a fetch (never refetched here)."""

    def __init__(self, keys: KeySet) -> None:
        self.keys: KeySet | None = keys

    async def refetch(self) -> KeySet | None:
        raise AssertionError("no JWKS fetch while measuring")


def signing_keys() -> dict[str, Any]:
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


def jwks(private: dict[str, Any]) -> KeySet:
    algorithms = pyjwt.algorithms.get_default_algorithms()
    document = {
        "keys": [
            {**json.loads(algorithms[alg].to_jwk(key.public_key())), "kid": alg, "alg": alg}  # type: ignore[attr-defined]
            for alg, key in private.items()
        ]
    }
    keys, skipped = jwt.parse_jwks(document)
    assert not skipped, skipped
    return keys


def token(private: dict[str, Any], alg: str = "RS256", **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": "svc-reporting",
        "aud": "orders-api",
        "iat": now,
        "exp": now + 3600,
        "scope": "orders:read",
        "plan": "gold",
        "email": "ops@example.com",
    } | overrides
    return pyjwt.encode(claims, private[alg], algorithm=alg, headers={"kid": alg, "typ": "at+jwt"})


def check_request(bearer: str | None, method: str = "GET") -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.context_extensions["api"] = "orders"
    http = request.attributes.request.http
    http.method = method
    http.path = "/orders/42?page=1"
    http.id = "1234567890"
    http.headers.update({":authority": "api.example.com", "user-agent": "bench/1.0", "x-request-id": "r-1"})
    if bearer is not None:
        http.headers["authorization"] = f"Bearer {bearer}"
    return request


def outcome(reply: Any) -> str:
    return "ok" if reply.HasField("ok_response") else str(reply.denied_response.status.code)


async def measure(iterations: int, state: Path) -> list[Row]:
    gateway = config.parse(CONFIG)
    private = signing_keys()
    tokens = JwtVerifier(gateway, time.time, sources={"corp": Keys(jwks(private))})
    store = SqliteKeyStore(state / "keys.db")  # API keys: never asked here
    cache = KeyCache(store, time.time, ttl=60, negative_ttl=5)
    keys = ApiKeyVerifier(cache, b"bench-pepper", gateway.api_keys, time.time)
    servicer = Authorization(Checker(gateway, [keys, tokens], time.time))
    expired = token(private, exp=int(time.time()) - 3600)
    scenarios: list[tuple[str, Any, str, bool]] = [  # (name, request, expected outcome, cache kept?)
        ("allow: cached valid JWT (RS256)", check_request(token(private)), "ok", True),
        ("403 missing scope: cached valid JWT", check_request(token(private), "POST"), "403", True),
        ("401 no token", check_request(None), "401", True),
        ("401 expired JWT (validated every call)", check_request(expired), "401", True),
        ("allow: uncached RS256 (full validation)", check_request(token(private, "RS256")), "ok", False),
        ("allow: uncached ES256 (full validation)", check_request(token(private, "ES256")), "ok", False),
        ("allow: uncached EdDSA (full validation)", check_request(token(private, "EdDSA")), "ok", False),
    ]
    rows = []
    try:
        for name, request, expected, cached in scenarios:
            n = iterations if cached else max(1, iterations // 10)
            for _ in range(200):  # warm: the token is in the cache now (when it can be)
                reply = await servicer.Check(request, None)  # type: ignore[arg-type]  # context: only for aborts
            assert outcome(reply) == expected, (name, outcome(reply))
            hits = tokens.cache.hits
            clear = tokens.cache.clear
            wall, cpu = time.perf_counter(), time.process_time()
            if cached:
                for _ in range(n):
                    await servicer.Check(request, None)  # type: ignore[arg-type]
            else:
                for _ in range(n):
                    clear()
                    await servicer.Check(request, None)  # type: ignore[arg-type]
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if name.startswith(("allow: cached", "403")):
                assert tokens.cache.hits - hits == n, f"{name}: not answered from the cache"
            rows.append(Row(name, n, wall, cpu))
    finally:
        await store.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jwt_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="calls per cached scenario (uncached: 1/10)")
    args = parser.parse_args(argv)
    logs.setup("authz", "info")  # denials are logged in the server too: pay the same formatting
    null = open(os.devnull, "w")  # noqa: SIM115 - held for the run, closed below
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(null)
    try:
        with tempfile.TemporaryDirectory(prefix="jwt-bench-") as tmp:
            rows = asyncio.run(measure(args.iterations, Path(tmp)))
    finally:
        null.close()
    print(f"authz Check for bearer JWTs ({sys.implementation.name} {sys.version.split()[0]})")
    print(table(rows))
    print(
        f"one worker's ceiling for cached-JWT allows ≈ {1e6 / rows[0].cpu_us:,.0f} calls/s (1 core / CPU µs per call)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
