"""The authz pipeline: a ``CheckInput`` in, a ``Decision`` out, one step after another.

    1. the route       a retired version → 410; an unknown API → 403; an anonymous one → allow
    2. the credential  the first one the API accepts (``authz.credentials``); none → 401
    3. the verifier    of the credential's kind (``authz.verifiers``) → an Identity, or a denial
    4. the policy      the API's scopes → allow with the identity's headers, or 403
    5. shadow mode     an API with ``auth.shadow`` lets a denied request through, saying so
    6. rate limits     with ``ratelimit.in_authz``, the limiter's answer on an allowed request

The Checker does no I/O of its own: the verifiers and the limiter do, behind their interfaces.
It is built once with the gateway.yaml in force and told of every reload (``reload``), which
drops its memos: a memo never outlives the config it was computed from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from authz import credentials, decision, errors, limits
from authz.credentials import Credential
from authz.decision import CheckInput, Decision, Identity
from authz.errors import Denial
from authz.memo import Memo
from authz.verifiers import Verifier
from ratelimit.limiter import Limiter
from sidegate.config import Api, Gateway
from sidegate.contract import rate_limit_shapes

DECISIONS = 10_000  # allowed decisions remembered, per (identity, API, request shape)


class Checker:
    def __init__(
        self,
        gateway: Gateway,
        verifiers: Iterable[Verifier],
        clock: Callable[[], float],
        *,
        limiter: Limiter | None = None,
    ) -> None:
        self.verifiers = {verifier.kind: verifier for verifier in verifiers}
        self.clock = clock
        self.limiter = limiter  # ratelimit.in_authz: one callout decides access and limits
        self.reload(gateway)

    def reload(self, gateway: Gateway) -> None:
        """Take the config now in force: APIs, scopes, versions and key settings change live."""
        self.gateway = gateway
        self.strip = gateway.claim_headers  # more headers only authz sets: removed unless set
        self.decisions: Memo[tuple[Any, ...], Decision] = Memo(DECISIONS)
        self._shapes: Memo[str, list[tuple[str, ...]]] = Memo(len(gateway.apis) + 1)
        for verifier in self.verifiers.values():
            verifier.reload(gateway)

    async def check(self, check: CheckInput) -> Decision:
        """The decision on one request. Never raises for client input."""
        gateway = self.gateway  # one config for the whole check, even if a reload lands meanwhile
        # No api: a caller that is not our Envoy (Istio's ext_authz provider) names none, and the
        # request's path picks the API as our route table would.
        api = gateway.api(check.api) if check.api else gateway.api_at(check.path, check.method)
        if api is None:
            return decision.deny(errors.UNKNOWN_API)
        result = decision.retired(check, api, self.clock()) or decision.route(check, api)
        if result is None:
            credential = credentials.find(check.headers, check.path, api.auth, gateway.api_keys)
            result = decision.missing(api) if credential is None else await self._verified(api, check, credential)
            if not result.allowed and api.auth.shadow:
                result = decision.shadow(api, check, result, credential)
        if result.allowed and self.limiter is not None and "limits" in check.context:
            result = await self._limit(api, gateway, check, result)  # anonymous routes too
        if result.allowed:
            result = _without_keys_in_query(result, check.path, gateway.api_keys.prefix)
        return result

    async def _verified(self, api: Api, check: CheckInput, credential: Credential) -> Decision:
        verifier = self.verifiers.get(credential.kind)
        if verifier is None:  # only when built without issuers: nothing can verify a token
            return decision.deny(errors.INVALID_TOKEN["issuer_unknown"], api)
        identity = await verifier.verify(credential, api)
        if isinstance(identity, Denial):
            return decision.deny(identity, api)
        return self._authorize(api, check, identity, credential)

    def _authorize(self, api: Api, check: CheckInput, identity: Identity, credential: Credential) -> Decision:
        """``decision.authorize``, remembered: it is a pure function of the identity, the API and
        the request's shape (with ``strip``, which comes with the config, as the memo does)."""
        memo = (identity, api.name, decision.authorize_shape(check, credential))
        result = self.decisions.get(memo)
        if result is None:
            result = decision.authorize(api, check, identity, credential, self.strip)
            self.decisions.put(memo, result)
        return result

    async def _limit(self, api: Api, gateway: Gateway, check: CheckInput, result: Decision) -> Decision:
        """The rate-limit decision Envoy's ratelimit filter would have asked for, taken here."""
        assert self.limiter is not None
        shapes = self._shapes.get(api.name)
        if shapes is None:
            shapes = rate_limit_shapes(api, gateway)
            self._shapes.put(api.name, shapes)
        wanted = limits.request(api, gateway, result.identity, check.method, check.source, shapes=shapes)
        if wanted is None:
            return result
        return limits.apply(result, await self.limiter.decide(wanted))


def _without_keys_in_query(result: Decision, path: str, prefix: str) -> Decision:
    """``result``, also stripping every query parameter that carries an API key (one the API
    does not read there included): a credential never reaches an upstream."""
    leaked = [name for name in credentials.keys_in_query(path, prefix) if name not in result.remove_query]
    if not leaked:
        return result
    return dataclasses.replace(result, remove_query=(*result.remove_query, *leaked))
