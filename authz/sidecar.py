"""authz's wiring: what ``sidegate serve`` starts for it, and the verifiers a gateway.yaml needs.

``AuthzSidecar`` is authz as the server kernel hosts it (``sidegate.server.Sidecar``): the key
store and its cache with the change feed, the JWKS sources refreshing in the background, the
verifiers, the ``Checker`` and the servicer, the key-admin API and, with
``ratelimit.in_authz``, the rate limiter (ratelimit's runner, not its servicer). ``verifiers``
builds the credential verifiers from a gateway.yaml and the environment; a missing secret is a
``SettingsError`` at start, never a surprise at the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz import admin
from authz.checker import Checker
from authz.errors import StoreUnavailable
from authz.introspection import Introspector
from authz.jwks import Http, HttpxClient, JwksSource
from authz.keycache import KeyCache
from authz.keyservice import KeyService
from authz.keystore import open_store
from authz.servicer import Authorization
from authz.verifiers import Verifier
from authz.verifiers.apikey import ApiKeyVerifier
from authz.verifiers.introspection import IntrospectionVerifier
from authz.verifiers.jwt import JwtVerifier
from ratelimit.limiter import Limiter
from ratelimit.runner import LimiterRunner
from sidegate import grpc_h2c
from sidegate.config import Gateway
from sidegate.contract import AUTHZ, SIDECAR_GRPC_SERVICE
from sidegate.errors import SettingsError
from sidegate.settings import Settings

USAGE_INTERVAL = 60.0
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 §3.2: at least the hash size


def _secret(environ: Mapping[str, str], variable: str, where: str) -> str:
    value = environ.get(variable, "")
    if not value:
        raise SettingsError(f"{where}: environment variable {variable} is not set")
    return value


def bearer_verifiers(
    gateway: Gateway, http: Http, clock: Callable[[], float], environ: Mapping[str, str]
) -> tuple[list[Verifier], list[JwksSource]]:
    """The JWT and introspection verifiers for the issuers of ``gateway``, and the key sources to
    run in the background. Secrets come from the environment variables the issuers name."""
    sources: list[JwksSource] = []
    secrets: dict[str, bytes] = {}
    introspectors: dict[str, Introspector] = {}
    for name, issuer in gateway.issuers.items():
        if issuer.discovery or issuer.jwks_uri is not None:
            sources.append(JwksSource(name, issuer, http, clock))
        if issuer.shared_secret_env is not None:
            where = f"issuers.{name}.shared_secret_env"
            secret = _secret(environ, issuer.shared_secret_env, where).encode()
            need = max(_HMAC_MIN_BYTES.get(alg, 0) for alg in issuer.algorithms)
            if len(secret) < need:
                raise SettingsError(f"{where}: {issuer.shared_secret_env} must hold at least {need} bytes")
            secrets[name] = secret
        if issuer.introspection is not None:
            where = f"issuers.{name}.introspection.client_secret_env"
            client_secret = _secret(environ, issuer.introspection.client_secret_env, where)
            introspectors[name] = Introspector(name, issuer, client_secret, http, clock)
    introspection = IntrospectionVerifier(gateway, introspectors)
    tokens = JwtVerifier(
        gateway, clock, sources={s.name: s for s in sources}, secrets=secrets, introspection=introspection
    )
    return [tokens, introspection], sources


def store_wait(gateway: Gateway) -> float:
    """How long a Check waits on the key store: well inside Envoy's timeout for the authz call,
    so that a slow store is answered 503 ``key_store_unavailable`` (or a stale entry) by authz,
    not 503 ``sidecar_unavailable`` by Envoy."""
    return min(1.0, 0.6 * gateway.sidecars.authz.timeout)


class AuthzSidecar:
    """authz as the server kernel hosts it (``sidegate.server.Sidecar``)."""

    service = SIDECAR_GRPC_SERVICE[AUTHZ]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner: LimiterRunner | None = None
        self.checker: Checker | None = None
        self._close: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def files(self, gateway: Gateway) -> list[Path]:
        return [] if self.runner is None else self.runner.files()

    def check(self, gateway: Gateway) -> None:
        if self.runner is not None:
            self.runner.check(gateway)

    async def start(self, server: grpc_h2c.Server, gateway: Gateway) -> None:
        settings = self.settings
        store = open_store(settings.redis_url, settings.state_dir)
        policy = gateway.api_keys
        cache = KeyCache(
            store,
            time.time,
            ttl=policy.cache_ttl,
            negative_ttl=policy.negative_cache_ttl,
            wait=store_wait(gateway),
        )
        pepper = settings.pepper()
        verifiers: list[Verifier] = [ApiKeyVerifier(cache, pepper, policy, time.time)]
        sources: list[JwksSource] = []
        if gateway.issuers:
            idp = HttpxClient()
            self._close.append(idp.close)
            tokens, sources = bearer_verifiers(gateway, idp, time.time, os.environ)
            verifiers += tokens
        limiter: Limiter | None = None
        if gateway.ratelimit.in_authz:
            self.runner = LimiterRunner(settings)
            limiter = await self.runner.start(gateway)
            self._close.append(self.runner.close)
        self.checker = Checker(gateway, verifiers, time.time, limiter=limiter)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(self.checker), server)
        self._tasks = [
            asyncio.create_task(cache.follow_changes(), name="key-changes"),
            asyncio.create_task(cache.write_usage_every(USAGE_INTERVAL), name="key-usage"),
            *(asyncio.create_task(source.run(), name=f"jwks-{source.name}") for source in sources),
        ]

        async def close_store() -> None:
            with contextlib.suppress(StoreUnavailable):
                await cache.flush_usage()
            await store.close()

        self._close.insert(0, close_store)
        await _first_fetches(sources)
        if settings.admin_port:
            service = KeyService(store, pepper, policy, time.time)
            admin_server = await admin.start(service, settings.token(), settings.host, settings.admin_port)
            self._close.insert(0, functools.partial(admin_server.stop, settings.grace))

    def reload(self, gateway: Gateway) -> None:
        # APIs, scopes, versions and key settings change live; issuers are read at start (a new
        # one needs a restart).
        if self.checker is not None:
            self.checker.reload(gateway)
        if self.runner is not None:
            self.runner.reload(gateway)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for close in self._close:
            await close()


async def _first_fetches(sources: list[JwksSource]) -> None:
    """Wait (boundedly) until each issuer's first key fetch has succeeded or failed.

    So a sidecar reports SERVING with keys in hand; an IdP that is down delays the start by at
    most its timeouts, and its tokens are then answered 503 until a fetch succeeds.
    """
    if not sources:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(10.0, max(2 * s.issuer.jwks.timeout for s in sources) + 0.5)
    while any(s.keys is None and s.failures == 0 for s in sources) and loop.time() < deadline:
        await asyncio.sleep(0.02)
