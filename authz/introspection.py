"""Opaque bearer tokens: OAuth 2.0 Token Introspection (RFC 7662).

authz POSTs the token to the issuer's introspection endpoint, authenticated with its own client
credentials (HTTP Basic, RFC 6749 §2.3.1). An answer is cached, keyed by the token's SHA-256,
until the earlier of the token's ``exp`` and the issuer's ``cache_ttl`` (``active: false`` for
``cache_ttl``: a revoked token stays revoked), so a revocation at the IdP takes effect within
``cache_ttl``. Concurrent misses for one token share one request. An IdP that does not answer
is ``IdpUnavailable`` (the servicer answers 503), never a 401 for a token that may be valid.

Without an ``endpoint`` the issuer's OIDC discovery document gives it (``introspection_endpoint``),
fetched on the first opaque token and kept; a failed discovery is ``IdpUnavailable`` and is tried
again by the next token (concurrent ones share one request).

``judge`` is the pure part: the answer's ``active``, ``exp``, ``nbf``, ``iss`` and ``aud``, then
the same claim → identity mapping as JWTs (the consumer claim falls back to ``client_id``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote_plus

from authz import jwt
from authz.errors import IdpUnavailable
from authz.jwks import Clock, Http, discover
from authz.jwt import Verified
from authz.memo import Memo
from sidegate.config import Issuer

INACTIVE = "inactive"  # errors.INVALID_TOKEN["inactive"]


def judge(answer: Mapping[str, Any], issuer: Issuer, name: str, now: float, ttl: float) -> Verified | str:
    """An introspection answer → the caller's identity (cached until ``expires``), or a verdict."""
    if answer.get("active") is not True:
        return INACTIVE
    exp = math.inf
    if "exp" in answer:
        number = jwt.numeric_date(answer["exp"])
        if number is None:
            return jwt.CLAIM_INVALID
        if now >= number + issuer.leeway:
            return jwt.EXPIRED
        exp = number
    if "nbf" in answer:
        nbf = jwt.numeric_date(answer["nbf"])
        if nbf is None:
            return jwt.CLAIM_INVALID
        if nbf > now + issuer.leeway:
            return jwt.NOT_YET_VALID
    if "iss" in answer and answer["iss"] != issuer.issuer:
        return jwt.ISSUER_UNKNOWN
    if "aud" in answer:
        problem = jwt.check_audience(answer["aud"], issuer)
        if problem is not None:
            return problem
    if answer.get(issuer.consumer_claim) is None and isinstance(answer.get("client_id"), str):
        answer = {**answer, issuer.consumer_claim: answer["client_id"]}
    return jwt.identity_of(answer, issuer, name, "introspection", expires=min(exp, now + ttl))


class Introspector:
    """Introspection for one issuer, with its cache; ``secret`` is the client secret."""

    def __init__(
        self, name: str, issuer: Issuer, secret: str, http: Http, clock: Clock, *, max_entries: int = 100_000
    ) -> None:
        assert issuer.introspection is not None
        self.name = name
        self.issuer = issuer
        self.policy = issuer.introspection
        self.http = http
        self.clock = clock
        self.cache: Memo[bytes, Verified | str] = Memo(max_entries, clock)
        # RFC 6749 §2.3.1: client_id and secret are form-encoded before Basic encoding.
        self._auth = (quote_plus(self.policy.client_id), quote_plus(secret))
        self._inflight: dict[bytes, asyncio.Task[Verified | str]] = {}
        self.requests = 0
        self.endpoint: str | None = self.policy.endpoint  # else found by discovery
        self._discovery: asyncio.Task[str] | None = None

    async def _endpoint(self) -> str:
        """The introspection endpoint: configured, or from discovery (one request at a time)."""
        if self.endpoint is not None:
            return self.endpoint
        if self._discovery is None:
            found = discover(self.http, self.issuer, "introspection_endpoint", self.policy.timeout)
            self._discovery = asyncio.create_task(found, name=f"discover-{self.name}")
            self._discovery.add_done_callback(self._discovered)
        return await asyncio.shield(self._discovery)

    def _discovered(self, task: asyncio.Task[str]) -> None:
        self._discovery = None
        if not task.cancelled() and task.exception() is None:
            self.endpoint = task.result()

    async def introspect(self, token: str, key: bytes) -> Verified | str:
        """The verdict on ``token`` (``key`` is its digest); raises ``IdpUnavailable``."""
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(token, key), name=f"introspect-{self.name}")
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(task)

    def _done(self, key: bytes, task: asyncio.Task[Verified | str]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: waiters re-raise it

    async def _ask(self, token: str, key: bytes) -> Verified | str:
        endpoint = await self._endpoint()
        self.requests += 1
        reply = await self.http.request(
            "POST",
            endpoint,
            timeout=self.policy.timeout,
            form={"token": token, "token_type_hint": "access_token"},
            auth=self._auth,
        )
        if reply.status != 200:
            raise IdpUnavailable(f"POST {endpoint}: status {reply.status}")
        try:
            answer = reply.json()
        except ValueError:
            raise IdpUnavailable(f"POST {endpoint}: not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise IdpUnavailable(f"POST {endpoint}: not an introspection answer")
        now = self.clock()
        result = judge(answer, self.issuer, self.name, now, self.policy.cache_ttl)
        expires = result.expires if isinstance(result, Verified) else now + self.policy.cache_ttl
        self.cache.put(key, result, expires)
        return result
