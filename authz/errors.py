"""Why authz denies a request, and what can go wrong behind it.

    Denial (a value, never raised for client input: returned in a Decision)
    ├── 401  missing_credentials · invalid_api_key (missing, malformed, wrong_environment,
    │        unknown, revoked, expired) · invalid_token (missing, malformed, expired, … see
    │        INVALID_TOKEN: one reason per way a bearer token fails)
    ├── 403  insufficient_scope · unknown_api
    ├── 410  api_version_gone (a version whose sunset passed while the config ran)
    └── 503  key_store_unavailable · jwks_unavailable · introspection_unavailable

    AuthzError (raised by backends, translated at one boundary)
    ├── StoreUnavailable    the key store cannot answer (Redis down, SQLite locked)
    └── IdpUnavailable      an identity provider did not answer usably (JWKS, discovery,
                            introspection): down, slow, not JSON, too large

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


class IdpUnavailable(AuthzError):  # noqa: N818
    """An identity provider did not answer usably; the message names the URL, never a token."""


# --- bearer tokens (RFC 6750 invalid_token), by reason: authz.jwt's verdicts ------------------


def _token(code: str, message: str) -> Denial:
    return Denial(401, "invalid_token", f"token_{code}", message)


INVALID_TOKEN = {
    "missing": _token("missing", "a bearer token is required"),
    "malformed": _token("malformed", "the bearer token is not well formed"),
    "too_large": _token("too_large", "the bearer token is too large"),
    "alg_none": _token("alg_none", "unsigned tokens are not accepted"),
    "alg_not_allowed": _token("alg_not_allowed", "the token's signing algorithm is not accepted for its issuer"),
    "crit_unsupported": _token("crit_unsupported", "the token names a critical header extension that is not supported"),
    "typ_mismatch": _token("typ_mismatch", "the token is not of the required type"),
    "kid_unknown": _token("kid_unknown", "the token's signing key is not one of its issuer's keys"),
    "key_mismatch": _token("key_mismatch", "the token's signing key does not suit its algorithm"),
    "signature_missing": _token("signature_missing", "the token carries no signature"),
    "signature_invalid": _token("signature_invalid", "the token's signature does not verify"),
    "issuer_unknown": _token("issuer_unknown", "the token's issuer is not accepted by this API"),
    "iss_missing": _token("iss_missing", "the token names no issuer (iss)"),
    "aud_missing": _token("aud_missing", "the token names no audience (aud)"),
    "exp_missing": _token("exp_missing", "the token has no expiry (exp)"),
    "audience_mismatch": _token("audience_mismatch", "the token is not meant for this API (aud)"),
    "expired": _token("expired", "the token has expired"),
    "not_yet_valid": _token("not_yet_valid", "the token is not valid yet"),
    "claim_invalid": _token("claim_invalid", "a claim of the token has the wrong type or value"),
    "consumer_missing": _token("consumer_missing", "the token names no consumer"),
    "inactive": _token("inactive", "the token is not active"),
}
JWKS_UNAVAILABLE = Denial(
    503, "temporarily_unavailable", "jwks_unavailable", "the token issuer's keys cannot be fetched; try again"
)
INTROSPECTION_UNAVAILABLE = Denial(
    503, "temporarily_unavailable", "introspection_unavailable", "the token cannot be introspected now; try again"
)
# Denials for a request that brought no credential at all: the challenge names no error
# (RFC 6750 §3.1).
NO_CREDENTIAL = frozenset({MISSING_CREDENTIALS, INVALID_API_KEY["missing"], INVALID_TOKEN["missing"]})
