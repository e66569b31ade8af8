"""The bearer-token verifiers as the Checker uses them, for tests that hand them bare tokens.

A token's shape picks its verifier (``authz.credentials.bearer``): a JWT goes to ``JwtVerifier``,
anything else to ``IntrospectionVerifier``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from authz import credentials
from authz.decision import Identity
from authz.errors import Denial
from authz.introspection import Introspector
from authz.verifiers.introspection import IntrospectionVerifier
from authz.verifiers.jwt import JwtVerifier, KeySource
from sidegate.config import Api, Gateway


class Tokens:
    def __init__(
        self,
        gateway: Gateway,
        clock: Callable[[], float],
        *,
        sources: Mapping[str, KeySource],
        secrets: Mapping[str, bytes] | None = None,
        introspectors: Mapping[str, Introspector] | None = None,
    ) -> None:
        self.introspection = IntrospectionVerifier(gateway, introspectors or {})
        self.jwt = JwtVerifier(gateway, clock, sources=sources, secrets=secrets, introspection=self.introspection)
        self.cache = self.jwt.cache

    async def verify(self, token: str, api: Api) -> Identity | Denial:
        credential = credentials.bearer(token)
        if credential.kind == credentials.JWT:
            return await self.jwt.verify(credential, api)
        return await self.introspection.verify(credential, api)
