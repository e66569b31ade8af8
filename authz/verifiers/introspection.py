"""The verifier of opaque bearer tokens: RFC 7662 introspection at the API's introspection issuer.

An opaque token names no issuer, so it is sent to one issuer only: the first of the API's
issuers with ``introspection`` (the config allows one per API). The HTTP exchange and its cache
are ``authz.introspection.Introspector``'s. JWTs of an issuer configured with introspection but
no keys come here too, from ``JwtVerifier``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from authz import credentials, errors, jwt
from authz.credentials import Credential
from authz.decision import Identity
from authz.errors import Denial, IdpUnavailable
from authz.introspection import Introspector
from authz.jwt import Verified
from authz.memo import digest
from authz.verifiers import accepted, token_problem
from sidegate import logs
from sidegate.config import Api, Gateway

log = logging.getLogger("authz.introspection")


class IntrospectionVerifier:
    kind = credentials.OPAQUE

    def __init__(self, gateway: Gateway, introspectors: Mapping[str, Introspector]) -> None:
        self.issuers = dict(gateway.issuers)  # read at start, as the introspectors' secrets are
        self.introspectors = dict(introspectors)

    async def verify(self, credential: Credential, api: Api) -> Identity | Denial:
        issuers = accepted(api, self.issuers)
        problem = token_problem(credential.value, issuers)
        if problem is not None:
            return errors.INVALID_TOKEN[problem]
        name = next((name for name, issuer in issuers if issuer.introspection), None)
        if name is None:
            return errors.INVALID_TOKEN[jwt.MALFORMED]
        result = await self.introspect(name, credential.value, digest(credential.value))
        if isinstance(result, Verified):
            return result.identity
        return result if isinstance(result, Denial) else errors.INVALID_TOKEN[result]

    async def introspect(self, name: str, token: str, key: bytes) -> Verified | Denial | str:
        """The verdict of issuer ``name`` on ``token`` (``key`` is its digest)."""
        introspector = self.introspectors.get(name)
        if introspector is None:
            return jwt.MALFORMED
        try:
            return await introspector.introspect(token, key)
        except IdpUnavailable as exc:
            log.warning("introspection failed", extra=logs.fields(issuer=name, problem=str(exc)))
            return errors.INTROSPECTION_UNAVAILABLE

    def reload(self, gateway: Gateway) -> None:
        """Issuers are read at start (a new one needs a restart); answers stay cached."""
