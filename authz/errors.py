"""Why authz denies a request, and what can go wrong behind it.

    Denial (a value, never raised for client input: returned in a Decision)
    ├── 401  missing_credentials · invalid_api_key (missing, malformed, wrong_environment,
    │        unknown, revoked, expired)
    ├── 403  insufficient_scope · unknown_api
    ├── 410  api_version_gone (a version whose sunset passed while the config ran)
    └── 503  key_store_unavailable

    AuthzError (raised by backends, translated at one boundary)
    └── StoreUnavailable    the key store cannot answer (Redis down, SQLite locked)

``error`` is the wire name (JSON ``error``, RFC 6750 ``error=``); ``code`` is the stable
snake_case reason used in logs and metric labels.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Denial:
    http_status: int
    error: str
    code: str
    message: str


MISSING_CREDENTIALS = Denial(401, "missing_credentials", "missing_credentials", "this API requires credentials")
UNKNOWN_API = Denial(403, "unknown_api", "unknown_api", "no authorization policy for this route")
INSUFFICIENT_SCOPE = Denial(403, "insufficient_scope", "insufficient_scope", "the credential lacks a required scope")
API_VERSION_GONE = Denial(410, "api_version_gone", "api_version_gone", "this API version has been retired")
KEY_STORE_UNAVAILABLE = Denial(
    503, "temporarily_unavailable", "key_store_unavailable", "the key store cannot be reached; try again"
)

# invalid_api_key, by reason (apikeys.check's verdicts plus "missing")
INVALID_API_KEY = {
    "missing": Denial(401, "invalid_api_key", "api_key_missing", "an API key is required"),
    "malformed": Denial(401, "invalid_api_key", "api_key_malformed", "the API key is not well formed"),
    "wrong_environment": Denial(
        401, "invalid_api_key", "api_key_wrong_environment", "the API key belongs to another environment"
    ),
    "unknown": Denial(401, "invalid_api_key", "api_key_unknown", "the API key is not known"),
    "revoked": Denial(401, "invalid_api_key", "api_key_revoked", "the API key has been revoked"),
    "expired": Denial(401, "invalid_api_key", "api_key_expired", "the API key has expired"),
}


class AuthzError(Exception):
    """Base of errors raised inside authz (never for client input)."""


class StoreUnavailable(AuthzError):  # noqa: N818 - reads as a state, like Envoy's names
    """The key store did not answer."""


class KeyNotFound(AuthzError):  # noqa: N818
    """A management operation named a key id the store does not have."""
