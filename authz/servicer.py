"""Envoy ext_authz gRPC servicer: CheckRequest → the decision steps → CheckResponse.

The servicer converts proto ⇄ domain and does the one lookup the decision needs (the key
record from the cache, or the bearer token's verdict from ``authz.bearer``). It never raises
for client input; an exception nobody expected is logged and answered INTERNAL, which Envoy
turns into its configured failure status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz import admin, apikeys, bearer, credentials, decision, errors, limits
from authz.apikeys import KeyRecord
from authz.bearer import Bearer
from authz.credentials import Credential
from authz.decision import CheckInput, Decision
from authz.errors import StoreUnavailable
from authz.jwks import HttpxClient, JwksSource
from authz.keycache import KeyCache
from authz.keyservice import KeyService
from authz.keystore import open_store
from ratelimit.limiter import Limiter
from ratelimit.runner import LimiterRunner
from sidegate import grpc_h2c, logs, telemetry
from sidegate.config import Api, Gateway
from sidegate.contract import AUTHZ, SIDECAR_GRPC_SERVICE
from sidegate.settings import Settings

USAGE_INTERVAL = 60.0
ALLOWED_LOG_EVERY = 100  # allowed requests are logged 1 in N (every denial is)
AUTHORIZED_MEMO = 10_000  # key decisions remembered (see _key_decision); past it, start again
log = logging.getLogger("authz")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CODES = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED, 503: code_pb2.UNAVAILABLE}


def _header(name: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def to_response(result: Decision) -> Any:
    if result.allowed:
        return _allowed(result)
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_CODES.get(result.status, code_pb2.PERMISSION_DENIED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=result.status), headers=headers_of(result.headers), body=result.body
        ),
    )


def headers_of(pairs: tuple[tuple[str, str], ...]) -> list[Any]:
    return [_header(k, v) for k, v in pairs]


_ALLOWED: dict[tuple[Any, ...], Any] = {}  # what an allowed answer carries → its response, read-only
ALLOWED_CACHE = 10_000  # distinct consumer and API answers kept; past it, start again


def _allowed(result: Decision) -> Any:
    """An allowed decision's response: built once per distinct answer (the same consumer on the
    same API gets the same headers and metadata), plus the per-request rate-limit fields if any."""
    key = (result.headers, result.remove, result.remove_query, tuple(result.metadata.items()))
    response = _ALLOWED.get(key)
    if response is None:
        metadata = struct_pb2.Struct()
        metadata.update(dict(result.metadata))
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=headers_of(result.headers),
                headers_to_remove=list(result.remove),
                query_parameters_to_remove=list(result.remove_query),
            ),
            dynamic_metadata=metadata,
        )
        if len(_ALLOWED) >= ALLOWED_CACHE:
            _ALLOWED.clear()
        _ALLOWED[key] = response
    if not result.response_headers:
        return response  # shared: grpc only serializes it
    own = external_auth_pb2.CheckResponse()
    own.CopyFrom(response)
    added = own.ok_response.response_headers_to_add
    for name, value in result.response_headers:
        added.add(header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE)
    return own


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        gateway: Gateway,
        keys: KeyCache,
        pepper: bytes,
        clock: Callable[[], float],
        *,
        bearer: Bearer | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.gateway = gateway
        self.keys = keys
        self.pepper = pepper
        self.clock = clock
        self.bearer = bearer
        self.limiter = limiter  # ratelimit.in_authz: one callout decides access and limits
        self._strip: tuple[Gateway, tuple[str, ...]] | None = None
        # (key id, API name, request shape) → the record and API it was built from, and the decision
        self._authorized: dict[tuple[Any, ...], tuple[KeyRecord, Api, Decision]] = {}

    @property
    def strip(self) -> tuple[str, ...]:
        """The claim headers a client may have forged (of the gateway in force: it may be reloaded)."""
        if self._strip is None or self._strip[0] is not self.gateway:
            self._strip = (self.gateway, self.gateway.claim_headers)
        return self._strip[1]

    async def Check(self, request: Any, context: grpc_h2c.Context) -> Any:  # noqa: N802
        http = request.attributes.request.http
        check = CheckInput(
            api=request.attributes.context_extensions.get("api"),
            method=http.method,
            path=http.path,
            headers=http.headers,
            context=request.attributes.context_extensions,
        )
        started = time.perf_counter()
        # Envoy's call carries the trace (traceparent) in its gRPC metadata.
        carrier = telemetry.carrier(context)
        with telemetry.span("authz.check", carrier) as span:
            try:
                result = await self.decide(check)
                if result.allowed and self.limiter is not None and "limits" in check.context:
                    result = await self.limit(check, result, request.attributes.source.address.socket_address)
            except Exception:
                log.exception("unexpected error in Check", extra=logs.fields(api=check.api, method=check.method))
                telemetry.DECISIONS.labels("authz", "error", "internal").inc()
                await context.abort(grpc.StatusCode.INTERNAL, "authz internal error")
            outcome = "allow" if result.allowed else "deny"
            if span.is_recording():
                span.set_attribute("sidegate.outcome", outcome)
                span.set_attribute("sidegate.reason", result.code)
                span.set_attribute("sidegate.api", check.api or "")
                if result.identity is not None:
                    span.set_attribute("sidegate.consumer", result.identity.consumer)
        telemetry.decision("authz", outcome, result.code, time.perf_counter() - started)
        self._log(check, result, carrier.get("traceparent") or check.headers.get("traceparent", ""))
        return to_response(result)

    async def limit(self, check: CheckInput, result: Decision, source: Any) -> Decision:
        """The rate-limit decision Envoy's ratelimit filter would have asked for, taken here."""
        api = self.gateway.api(check.api) if check.api else None
        wanted = limits.request(api, self.gateway, result.identity, check.method, source.address) if api else None
        if wanted is None or self.limiter is None:
            return result
        return limits.apply(result, await self.limiter.decide(wanted))

    async def decide(self, check: CheckInput) -> Decision:
        api = self.gateway.api(check.api) if check.api else None
        early = decision.retired(check, api, self.clock()) or decision.route(check, api)
        if early is not None or api is None:
            return early or decision.deny(errors.UNKNOWN_API)
        credential = credentials.find(check.headers, check.path, api.auth, self.gateway.api_keys)
        if credential is None:
            return decision.missing(api)
        if credential.kind == credentials.BEARER:
            if self.bearer is None:  # only when built without issuers (tests): nothing can verify it
                return decision.deny(errors.INVALID_TOKEN["issuer_unknown"], api)
            verified = await self.bearer.verify(credential.value, api)
            if isinstance(verified, errors.Denial):
                return decision.deny(verified, api)
            return decision.authorize(api, check, verified, credential, self.strip)
        parsed = apikeys.parse(credential.value)
        try:
            record = await self.keys.get(parsed.key_id) if parsed is not None else None
        except StoreUnavailable:
            return decision.deny(errors.KEY_STORE_UNAVAILABLE, api)
        refused = decision.check_key(
            credential, parsed, record, pepper=self.pepper, policy=self.gateway.api_keys, now=self.clock()
        )
        if refused is not None:
            return decision.deny(refused, api)
        assert record is not None
        self.keys.used(record.key_id)
        return self._key_decision(api, check, credential, record)

    def _key_decision(self, api: Api, check: CheckInput, credential: Credential, record: KeyRecord) -> Decision:
        """``authorize`` for a key that passed its check, built once per (record, API, request
        shape): it is a pure function of those and of ``strip``, which comes with the API's
        gateway (a reload parses new ``Api`` objects). The key's own check runs every time."""
        memo = (record.key_id, api.name, decision.authorize_shape(check, credential))
        hit = self._authorized.get(memo)
        if hit is not None and hit[0] is record and hit[1] is api:
            return hit[2]
        result = decision.authorize(api, check, decision.key_identity(record), credential, self.strip)
        if len(self._authorized) >= AUTHORIZED_MEMO:
            self._authorized.clear()
        self._authorized[memo] = (record, api, result)
        return result

    @staticmethod
    def _log(check: CheckInput, result: Decision, traceparent: str) -> None:
        """One JSON line per denial, and for one allowed request in ``ALLOWED_LOG_EVERY``."""
        if result.allowed and random.random() >= 1 / ALLOWED_LOG_EVERY:  # noqa: S311 - sampling, not security
            return
        log.info(
            "allowed" if result.allowed else "denied",
            extra=logs.fields(
                code=result.code,
                status=result.status,
                api=check.api,
                method=check.method,
                consumer=result.identity.consumer if result.identity else None,
                request_id=check.headers.get("x-request-id"),
                trace_id=telemetry.trace_id(traceparent),
            ),
        )


class AuthzSidecar:
    """authz as the server kernel hosts it (``sidegate.server.Sidecar``): the servicer, the key
    store and cache with its change feed, the JWKS sources, the admin API and, with
    ``ratelimit.in_authz``, the rate limiter (ratelimit's runner, not its servicer)."""

    service = SIDECAR_GRPC_SERVICE[AUTHZ]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runner: LimiterRunner | None = None
        self.servicer: Authorization | None = None
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
        cache = KeyCache(store, time.time, ttl=policy.cache_ttl, negative_ttl=policy.negative_cache_ttl)
        pepper = settings.pepper()
        tokens: Bearer | None = None
        sources: list[JwksSource] = []
        if gateway.issuers:
            idp = HttpxClient()
            self._close.append(idp.close)
            tokens, sources = bearer.build(gateway, idp, time.time, os.environ)
        limiter: Limiter | None = None
        if gateway.ratelimit.in_authz:
            self.runner = LimiterRunner(settings)
            limiter = await self.runner.start(gateway)
            self._close.append(self.runner.close)
        self.servicer = Authorization(gateway, cache, pepper, time.time, bearer=tokens, limiter=limiter)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.servicer, server)
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
        # APIs, scopes and versions change live; issuers are read at start (a new one needs a restart).
        if self.servicer is not None:
            self.servicer.gateway = gateway
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
