"""Find the credential a request presents, for an API's ``auth`` policy. Pure.

API keys come from the configured header (``x-api-key``), ``Authorization: ApiKey <key>``, or —
only where the API names one — a query parameter. Bearer tokens (APIs with ``auth.jwt``) come
from ``Authorization: Bearer <token>`` only (RFC 6750 §2.1: never from the query, where logs
keep it). A bearer token of three dot-separated segments is a JWT, any other an opaque token
(RFC 7662 introspection). The place a credential came from is kept so authz can strip it before
the request goes upstream. Each kind has its verifier (``authz.verifiers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from authz import apikeys
from sidegate.config import ApiKeys, Auth

API_KEY = "api_key"
KEY_ID_MIN, KEY_SECRET_MIN = 8, 16  # characters: what a value needs to be taken for one of our keys
JWT = "jwt"  # a bearer token shaped like a JWS: header.payload.signature
OPAQUE = "opaque"  # any other bearer token
BEARER = (JWT, OPAQUE)


@dataclass(frozen=True)
class Credential:
    kind: str
    value: str
    header: str | None = None  # the header it came in, to remove upstream
    query: str | None = None  # or the query parameter


def _scheme(authorization: str, scheme: str) -> str | None:
    name, _, value = authorization.strip().partition(" ")
    return value.strip() if name.lower() == scheme.lower() and value.strip() else None


def find(headers: Mapping[str, str], path: str, auth: Auth, keys: ApiKeys) -> Credential | None:
    """The first credential the API accepts, or None."""
    if auth.api_key:
        value = headers.get(keys.header, "").strip()
        if value:
            return Credential(API_KEY, value, header=keys.header)
        from_authorization = _scheme(headers.get("authorization", ""), "ApiKey")
        if from_authorization:
            return Credential(API_KEY, from_authorization, header="authorization")
        if auth.api_key_query and "?" in path:
            for name, value in parse_qsl(urlsplit(path).query, keep_blank_values=False):
                if name == auth.api_key_query:
                    return Credential(API_KEY, value, query=name)
    if auth.jwt:
        token = _scheme(headers.get("authorization", ""), "Bearer")
        if token:
            return bearer(token)
    return None


def keys_in_query(path: str, prefix: str) -> tuple[str, ...]:
    """The query parameters of ``path`` whose value is shaped like an API key of this gateway
    (``<prefix>_<environment>_<id>_<secret>``, any environment), wherever the API looks for keys:
    authz strips them, so a key never reaches an upstream, even one sent where it is not read."""
    _, mark, query = path.partition("?")
    if not mark or prefix + "_" not in query:  # the common case costs a substring search
        return ()
    names = []
    for name, value in parse_qsl(query.partition("#")[0], keep_blank_values=False):
        parsed = apikeys.parse(value.strip())
        if parsed is not None and parsed.prefix == prefix and _long_enough(parsed) and name not in names:
            names.append(name)
    return tuple(names)


def _long_enough(parsed: apikeys.ParsedKey) -> bool:
    """An id and a secret as long as the ones we issue (not any ``a_b_c_d`` a query may hold)."""
    return len(parsed.key_id) >= KEY_ID_MIN and len(parsed.secret) >= KEY_SECRET_MIN


def bearer(token: str) -> Credential:
    """A bearer token from ``Authorization``, as a JWT or an opaque token by its shape."""
    return Credential(JWT if token.count(".") == 2 else OPAQUE, token, header="authorization")
