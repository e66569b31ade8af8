"""Credential verifiers: one per kind of credential, behind one small protocol (``Verifier``).

The ``Checker`` finds a request's credential (``authz.credentials``) and hands it to the verifier
of its kind, as Authorino hands it to an identity evaluator:

    apikey.ApiKeyVerifier                API keys: the key cache, the digest, the record's status
    jwt.JwtVerifier                      JWTs: the issuer's keys (JWKS) or shared secret
    introspection.IntrospectionVerifier  opaque tokens: RFC 7662 at the API's introspection issuer

A verifier answers who the credential names (``Identity``) or why it is refused (``Denial``). It
never raises for client input. It owns its caches, and drops what a reload or a key change makes
stale. ``reload`` gives it the gateway.yaml in force.
"""

from __future__ import annotations

import re
from typing import Protocol

from authz.credentials import Credential
from authz.decision import Identity
from authz.errors import Denial
from authz.jwt import MALFORMED, TOO_LARGE
from sidegate.config import Api, Gateway, Issuer

_B64TOKEN = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")  # RFC 6750 §2.1


class Verifier(Protocol):
    kind: str  # the credential kind it verifies (authz.credentials)

    async def verify(self, credential: Credential, api: Api) -> Identity | Denial:
        """Who ``credential`` names, if ``api`` accepts it; else why not."""
        ...

    def reload(self, gateway: Gateway) -> None:
        """The config in force changed: take the new one, drop what depended on the old."""
        ...


def accepted(api: Api, issuers: dict[str, Issuer]) -> list[tuple[str, Issuer]]:
    """The issuers ``api`` accepts bearer tokens from (read per request: a reload may change it)."""
    return [(name, issuers[name]) for name in api.auth.jwt if name in issuers]


def token_problem(token: str, accepted: list[tuple[str, Issuer]]) -> str | None:
    """A bearer token too large for every accepted issuer, or not RFC 6750's b64token: a verdict."""
    if len(token) > max((issuer.max_token_bytes for _, issuer in accepted), default=0):
        return TOO_LARGE
    if not _B64TOKEN.match(token):
        return MALFORMED
    return None
