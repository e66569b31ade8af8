"""An issuer's signing keys: OIDC discovery, JWKS fetches, background refresh, last known good.

One ``JwksSource`` per issuer and worker process. It fetches at start, then in the background
as often as the IdP's ``Cache-Control: max-age`` says, bounded by the issuer's ``jwks``
settings (``min_refresh`` ≤ delay ≤ ``max_refresh``; ``refresh`` when no max-age is sent).
A request never waits on it, except for the one refetch a token with an unknown ``kid`` may
trigger: the first at once, then at most one per ``unknown_kid_refetch`` per issuer, shared by
every request waiting at that moment, so a flood of forged ``kid`` values costs the IdP nothing
more. The start and the background refreshes do not count against it.
When the IdP is down or answers nonsense, the last good key set stays in force.

With discovery, ``<issuer>/.well-known/openid-configuration`` must name the same issuer
(OpenID Connect Discovery §4.3) and an http(s) ``jwks_uri``; it is read again at each refresh.
HTTP sits behind the small ``Http`` protocol (``HttpxClient`` in production): no redirects,
short timeouts, bounded answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from authz.errors import IdpUnavailable
from authz.jwt import KeySet, parse_jwks
from sidegate import logs
from sidegate.config import Issuer, idp_url

log = logging.getLogger("authz.jwks")
Clock = Callable[[], float]
MAX_BODY = 1 << 20  # no IdP answer needs more than 1 MiB
DISCOVERY_PATH = "/.well-known/openid-configuration"
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|$)", re.IGNORECASE)
FIRST_RETRY = 1.0  # after a failed fetch, retry after 1s, 2s, 4s, … up to min_refresh


# --- HTTP ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]  # lower-case names

    def json(self) -> Any:
        return json.loads(self.body)


class Http(Protocol):
    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        form: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> Reply:
        """One request; raises ``IdpUnavailable`` when no answer came (or a too large one)."""
        ...


class HttpxClient:
    """``Http`` over one pooled ``httpx.AsyncClient``: no redirects, a total deadline, a size cap."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._client = httpx.AsyncClient(
            follow_redirects=False, headers={"accept": "application/json", "user-agent": "sidegate-authz"}
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        form: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> Reply:
        try:
            async with asyncio.timeout(timeout):
                async with self._client.stream(
                    method, url, data=dict(form) if form else None, auth=auth, timeout=timeout
                ) as response:
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > self.max_body:
                            raise IdpUnavailable(f"{method} {url}: answer larger than {self.max_body} bytes")
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    return Reply(response.status_code, bytes(body), headers)
        except TimeoutError:
            raise IdpUnavailable(f"{method} {url}: no answer within {timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise IdpUnavailable(f"{method} {url}: {type(exc).__name__}") from None

    async def close(self) -> None:
        await self._client.aclose()


def max_age(cache_control: str | None) -> float | None:
    """Seconds from ``Cache-Control`` (0 for no-store/no-cache), or None when it says nothing."""
    if not cache_control:
        return None
    if _NO_CACHE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


def refresh_delay(cache_control: str | None, issuer: Issuer) -> float:
    """How long the keys just fetched are used before the next background fetch."""
    policy = issuer.jwks
    seconds = max_age(cache_control)
    if seconds is None:
        seconds = policy.refresh
    return min(max(seconds, policy.min_refresh), policy.max_refresh)


async def discover(http: Http, issuer: Issuer, name: str, timeout: float) -> str:
    """The URL ``name`` (``jwks_uri``, ``introspection_endpoint``) of the issuer's OIDC discovery
    document, which must name this issuer; raises ``IdpUnavailable``."""
    url = issuer.issuer.rstrip("/") + DISCOVERY_PATH
    reply = await http.request("GET", url, timeout=timeout)
    if reply.status != 200:
        raise IdpUnavailable(f"GET {url}: status {reply.status}")
    try:
        document = reply.json()
    except ValueError:
        raise IdpUnavailable(f"GET {url}: not JSON") from None
    if not isinstance(document, dict) or document.get("issuer") != issuer.issuer:
        found = document.get("issuer") if isinstance(document, dict) else None
        raise IdpUnavailable(f"GET {url}: names issuer {found!r}, not {issuer.issuer!r}")
    value = document.get(name)
    try:
        return idp_url(value) if isinstance(value, str) else idp_url("")
    except ValueError:
        raise IdpUnavailable(f"GET {url}: unusable {name} {value!r}") from None


# --- one issuer's keys ------------------------------------------------------------------------------


class JwksSource:
    """The current key set of one issuer, kept fresh; ``keys`` is None until a first success."""

    def __init__(self, name: str, issuer: Issuer, http: Http, clock: Clock) -> None:
        self.name = name
        self.issuer = issuer
        self.http = http
        self.clock = clock
        self.keys: KeySet | None = None
        self.jwks_uri: str | None = issuer.jwks_uri
        self.next_refresh = 0.0  # seconds to wait after the last success
        self.fetches = 0
        self.failures = 0
        self._last_unknown = -math.inf  # the last refetch an unknown kid asked for
        self._inflight: asyncio.Task[KeySet] | None = None

    async def fetch(self) -> KeySet:
        """Fetch now (joining a fetch already under way); raises ``IdpUnavailable``, keeping the old keys."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name=f"jwks-{self.name}")
            self._inflight.add_done_callback(self._done)
        return await asyncio.shield(self._inflight)

    def _done(self, task: asyncio.Task[KeySet]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter re-raises it, nobody else must log it

    async def _fetch(self) -> KeySet:
        self.fetches += 1
        timeout = self.issuer.jwks.timeout
        try:
            if self.issuer.discovery:
                self.jwks_uri = await self._discover(timeout)
            assert self.jwks_uri is not None
            reply = await self.http.request("GET", self.jwks_uri, timeout=timeout)
            if reply.status != 200:
                raise IdpUnavailable(f"GET {self.jwks_uri}: status {reply.status}")
            try:
                keys, skipped = parse_jwks(reply.json())
            except ValueError as exc:
                raise IdpUnavailable(f"GET {self.jwks_uri}: {exc}") from None
            if not keys.keys:
                raise IdpUnavailable(f"GET {self.jwks_uri}: no usable key")
        except IdpUnavailable as exc:
            self.failures += 1
            kept = self.keys is not None
            log.warning("jwks fetch failed", extra=logs.fields(issuer=self.name, problem=str(exc), keeping_last=kept))
            raise
        for problem in skipped:
            log.warning("jwks key skipped", extra=logs.fields(issuer=self.name, problem=problem))
        self.keys = keys
        self.next_refresh = refresh_delay(reply.headers.get("cache-control"), self.issuer)
        log.info("jwks fetched", extra=logs.fields(issuer=self.name, kids=list(keys.kids), refresh_s=self.next_refresh))
        return keys

    async def _discover(self, timeout: float) -> str:
        return await discover(self.http, self.issuer, "jwks_uri", timeout)

    async def refetch(self) -> KeySet | None:
        """For a token whose kid is unknown: fresh keys, or None when rate-limited or the IdP failed.

        The first unknown kid is fetched at once, however recent the last fetch at start or in
        the background: a new key right after a rotation works. Then at most one such refetch
        per ``unknown_kid_refetch``, so a flood of unknown kids costs the IdP one request per
        interval. Requests arriving while a fetch is under way share it.
        """
        if self._inflight is None:
            now = self.clock()
            if now - self._last_unknown < self.issuer.jwks.unknown_kid_refetch:
                return None
            self._last_unknown = now
        with contextlib.suppress(IdpUnavailable):
            return await self.fetch()
        return None

    async def run(self) -> None:
        """Fetch now, then keep refreshing until cancelled; failures back off and keep the old keys."""
        retry = FIRST_RETRY
        while True:
            try:
                await self.fetch()
            except Exception as exc:
                if not isinstance(exc, IdpUnavailable):  # a bug: say so, and keep refreshing
                    log.exception("jwks refresh failed", extra=logs.fields(issuer=self.name))
                await asyncio.sleep(min(retry, self.issuer.jwks.min_refresh))
                retry *= 2
                continue
            retry = FIRST_RETRY
            await asyncio.sleep(self.next_refresh)
