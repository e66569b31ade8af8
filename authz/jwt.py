"""JWT access tokens: parse, pick the key, verify the signature, check the claims. Pure.

No I/O and no clock of its own: callers pass the issuer's policy (``sidegate.config.Issuer``),
its current key set, the shared secret for ``HS*`` and ``now``. Every failure is a verdict — a
key of ``errors.INVALID_TOKEN`` — never an exception, so a hostile token can only ever be
refused. What this module refuses, and why:

* a token longer than the issuer's ``max_token_bytes``, not three base64url segments, or whose
  header or payload is not one JSON object (duplicate members and NaN included);
* ``alg: none`` and every algorithm outside the issuer's allowlist — with ``HS*`` allowed only
  with the configured shared secret, a token "signed" with a public key as HMAC secret is
  refused before any key is read (algorithm confusion);
* any ``crit`` header: no JWS extension is understood here (RFC 7515 §4.1.11);
* a ``typ`` other than the required one (RFC 9068 ``at+jwt``), when the issuer requires one.

Keys come only from the issuer's JWKS, chosen by ``kid``; ``jku``, ``x5u``, ``jwk`` and ``x5c``
are never read. A key must suit the algorithm (kty, curve, its own ``alg``). Then ``iss``,
``aud`` and ``exp`` are required, ``nbf`` and ``iat`` checked when present, all with the
issuer's leeway.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import InvalidKeyError

from authz.decision import Identity
from sidegate.config import HMAC_ALGORITHMS, Issuer

# Verdicts (the keys of errors.INVALID_TOKEN) this module returns.
MALFORMED = "malformed"
TOO_LARGE = "too_large"
ALG_NONE = "alg_none"
ALG_NOT_ALLOWED = "alg_not_allowed"
CRIT_UNSUPPORTED = "crit_unsupported"
TYP_MISMATCH = "typ_mismatch"
KID_UNKNOWN = "kid_unknown"
KEY_MISMATCH = "key_mismatch"
SIGNATURE_MISSING = "signature_missing"
SIGNATURE_INVALID = "signature_invalid"
ISSUER_UNKNOWN = "issuer_unknown"
ISS_MISSING = "iss_missing"
AUD_MISSING = "aud_missing"
EXP_MISSING = "exp_missing"
AUDIENCE_MISMATCH = "audience_mismatch"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
CLAIM_INVALID = "claim_invalid"
CONSUMER_MISSING = "consumer_missing"
# Not the client's fault: the issuer's keys have never been fetched (errors.JWKS_UNAVAILABLE).
KEYS_UNAVAILABLE = "keys_unavailable"

_SEGMENT = re.compile(r"^[A-Za-z0-9_-]*$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_HEADER_VALUE = 1024
MAX_CONSUMER = 256

# The algorithm objects of PyJWT that verify signatures, by JWS name; "none" is not among them.
_VERIFIERS: dict[str, Algorithm] = {
    name: alg
    for name, alg in get_default_algorithms().items()
    if name in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
}
# What key each algorithm needs: (kty, curves; None = any curve of that kty).
_KEY_TYPES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", ("P-256",)),
    "ES384": ("EC", ("P-384",)),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}
_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
MIN_RSA_BITS = 2048


# --- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One verification key from an issuer's JWKS, loaded once."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own ``alg``, when the IdP pins one
    public: Any  # a cryptography public key

    def suits(self, alg: str) -> bool:
        kty, curves = _KEY_TYPES[alg]
        return self.kty == kty and (curves is None or self.crv in curves) and self.alg in (None, alg)


@dataclass(frozen=True)
class KeySet:
    keys: tuple[Key, ...] = ()

    def find(self, kid: str | None) -> tuple[Key, ...]:
        return tuple(key for key in self.keys if key.kid == kid)

    @property
    def kids(self) -> tuple[str | None, ...]:
        return tuple(key.kid for key in self.keys)


def parse_jwks(document: object) -> tuple[KeySet, list[str]]:
    """A JWKS document (RFC 7517) → its usable verification keys, and why others were skipped.

    Raises ``ValueError`` when the document is not ``{"keys": [...]}``. Symmetric keys,
    keys for encryption, keys with private parts and RSA keys under 2048 bits are skipped.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS document: {"keys": [...]} expected')
    keys: list[Key] = []
    skipped: list[str] = []
    for index, jwk in enumerate(document["keys"]):
        key, problem = _load(jwk)
        if key is None:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            skipped.append(f"keys[{index}] (kid {kid!r}): {problem}")
        else:
            keys.append(key)
    return KeySet(tuple(keys)), skipped


def _load(jwk: object) -> tuple[Key | None, str]:
    if not isinstance(jwk, dict):
        return None, "not an object"
    kty, kid, alg, use = jwk.get("kty"), jwk.get("kid"), jwk.get("alg"), jwk.get("use")
    if kid is not None and not isinstance(kid, str):
        return None, "kid is not a string"
    if use not in (None, "sig") or ("key_ops" in jwk and "verify" not in (jwk.get("key_ops") or ())):
        return None, "not a signature key"
    if any(part in jwk for part in ("d", "p", "q", "k")):
        return None, "holds private or symmetric key material"
    if alg is not None and alg not in _KEY_TYPES:
        return None, f"alg {alg!r} is not accepted"
    family = {"RSA": "RS256", "EC": {"P-256": "ES256", "P-384": "ES384"}.get(str(jwk.get("crv"))), "OKP": "EdDSA"}
    name = family.get(str(kty))
    if not name:
        return None, f"unsupported kty/crv {kty!r}/{jwk.get('crv')!r}"
    try:
        public = _VERIFIERS[name].from_jwk(jwk)
    except (InvalidKeyError, ValueError, TypeError, binascii.Error) as exc:
        return None, f"cannot be loaded ({type(exc).__name__})"
    if kty == "RSA" and public.key_size < MIN_RSA_BITS:
        return None, f"RSA key of {public.key_size} bits (at least {MIN_RSA_BITS})"
    crv = jwk.get("crv") if kty != "RSA" else None
    return Key(kid, str(kty), crv, alg, public), ""


# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A token split and decoded, not yet trusted."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any]
    signing_input: bytes
    signature: bytes
    size: int  # of the compact form, in bytes


class _DuplicateMemberError(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateMemberError(key)  # two `exp`s or two `alg`s: which one would a verifier read?
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(name)  # NaN, Infinity: not JSON (RFC 8259)


def _b64(segment: str) -> bytes:
    if not _SEGMENT.match(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json_object(segment: str) -> dict[str, Any]:
    value = json.loads(_b64(segment), object_pairs_hook=_object, parse_constant=_no_constant)
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value


def parse(token: str, max_bytes: int) -> Token | str:
    """Split a compact JWS and decode its header and payload; a verdict when it cannot be."""
    if len(token) > max_bytes:
        return TOO_LARGE
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return MALFORMED
    try:
        header = _json_object(parts[0])
        claims = _json_object(parts[1])
        signature = _b64(parts[2])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return MALFORMED
    return Token(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature, len(token))


def peek_issuer(token: Token) -> str | None:
    """The ``iss`` the token claims, to choose whose keys to verify it with (not yet trusted)."""
    iss = token.claims.get("iss")
    return iss if isinstance(iss, str) else None


# --- verifying ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    """A token that passed: who it names, until when it may be trusted."""

    identity: Identity
    expires: float
    # The kid of the JWKS key that verified it ("" when the token named none), so a cached verdict
    # dies with its key; None when no JWKS key did (a shared secret, introspection).
    kid: str | None = None


def _typ(value: str) -> str:
    value = value.lower()
    return value.removeprefix("application/")


def numeric_date(value: object) -> float | None:
    """A NumericDate (RFC 7519 §2), or None when the value is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def check_header(token: Token, policy: Issuer) -> str | None:
    """The header's verdict (alg, crit, typ), or None when it is acceptable."""
    alg = token.header.get("alg")
    if not isinstance(alg, str):
        return MALFORMED
    if alg.lower() == "none":
        return ALG_NONE
    if alg not in policy.algorithms:
        return ALG_NOT_ALLOWED
    if "crit" in token.header:
        crit = token.header["crit"]
        if not isinstance(crit, list) or not crit or not all(isinstance(c, str) for c in crit):
            return MALFORMED
        return CRIT_UNSUPPORTED  # we understand no extension, so every critical one is unknown
    if policy.typ is not None:
        typ = token.header.get("typ")
        if not isinstance(typ, str) or _typ(typ) != _typ(policy.typ):
            return TYP_MISMATCH
    kid = token.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return MALFORMED
    return None


def check_signature(token: Token, alg: str, keys: KeySet | None, secret: bytes | None) -> str | None:
    """Verify with the issuer's own key for ``kid`` (or its shared secret); None when it holds."""
    if not token.signature:
        return SIGNATURE_MISSING
    if alg in HMAC_ALGORITHMS:
        if not secret:
            return ALG_NOT_ALLOWED
        expected = hmac.new(secret, token.signing_input, _HMAC_HASHES[alg]).digest()
        return None if hmac.compare_digest(expected, token.signature) else SIGNATURE_INVALID
    if keys is None:
        return KEYS_UNAVAILABLE
    kid = token.header.get("kid")
    if kid is None:
        # No kid: only an issuer with a single key for this algorithm is unambiguous.
        candidates = tuple(key for key in keys.keys if key.suits(alg))
        if len(candidates) != 1:
            return KID_UNKNOWN
    else:
        found = keys.find(kid)
        if not found:
            return KID_UNKNOWN
        candidates = tuple(key for key in found if key.suits(alg))
        if not candidates:
            return KEY_MISMATCH
    verifier = _VERIFIERS[alg]
    for key in candidates:
        if verifier.verify(token.signing_input, key.public, token.signature):
            return None
    return SIGNATURE_INVALID


def check_claims(claims: Mapping[str, Any], policy: Issuer, now: float) -> str | None:
    """The registered claims: iss, aud, exp required; nbf, iat when present; None when they hold."""
    iss = claims.get("iss")
    if iss is None:
        return ISS_MISSING
    if iss != policy.issuer:
        return ISSUER_UNKNOWN
    if "exp" not in claims:
        return EXP_MISSING
    if "aud" not in claims:
        return AUD_MISSING
    exp, leeway = numeric_date(claims["exp"]), policy.leeway
    if exp is None:
        return CLAIM_INVALID
    if now >= exp + leeway:
        return EXPIRED
    for name in ("nbf", "iat"):  # a token issued in the future is not valid yet either
        if name in claims:
            at = numeric_date(claims[name])
            if at is None:
                return CLAIM_INVALID
            if at > now + leeway:
                return NOT_YET_VALID
    return check_audience(claims["aud"], policy)


def check_audience(aud: object, policy: Issuer) -> str | None:
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        return CLAIM_INVALID
    return None if any(a in policy.audiences for a in audiences) else AUDIENCE_MISMATCH


def verify(
    token: Token, policy: Issuer, *, name: str, keys: KeySet | None, secret: bytes | None, now: float
) -> Verified | str:
    """The whole check of one parsed token for issuer ``name``: a Verified, or a verdict."""
    if token.size > policy.max_token_bytes:
        return TOO_LARGE
    problem = check_header(token, policy) or check_signature(token, token.header["alg"], keys, secret)
    if problem is None:
        problem = check_claims(token.claims, policy, now)
    if problem is not None:
        return problem
    exp = numeric_date(token.claims["exp"])
    assert exp is not None
    verified = identity_of(token.claims, policy, name, "jwt", expires=exp)
    if isinstance(verified, Verified) and alg_uses_jwks(token.header["alg"]):
        return Verified(verified.identity, verified.expires, token.header.get("kid") or "")
    return verified


def alg_uses_jwks(alg: str) -> bool:
    """Whether tokens of ``alg`` are verified with a JWKS key (not the issuer's shared secret)."""
    return alg not in HMAC_ALGORITHMS


# --- claims → identity ------------------------------------------------------------------------


def scopes_of(claims: Mapping[str, Any]) -> tuple[str, ...] | None:
    """``scope`` (space-separated, RFC 8693/9068) or ``scp`` (a list, or a string); None if malformed."""
    value = claims.get("scope", claims.get("scp"))
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split()
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in v.split()]
    else:
        return None
    # Drop what is not a scope token, so no scope can smuggle a quote or a newline into a header.
    return tuple(dict.fromkeys(s for s in items if _SCOPE_TOKEN.match(s)))


def header_value(value: object) -> str | None:
    """A claim as one header value, or None when it cannot safely be one."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int) or (isinstance(value, float) and math.isfinite(value)):
        text = str(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        return None
    if not text or len(text) > MAX_HEADER_VALUE or _CONTROL.search(text):
        return None
    return text


def identity_of(claims: Mapping[str, Any], policy: Issuer, name: str, method: str, *, expires: float) -> Verified | str:
    """Claims already trusted → the caller's Identity (consumer, scopes, plan, version, headers)."""
    raw = claims.get(policy.consumer_claim)
    if raw is None:
        return CONSUMER_MISSING
    consumer = header_value(raw) if isinstance(raw, str | int) and not isinstance(raw, bool) else None
    if consumer is None or len(consumer) > MAX_CONSUMER:
        return CLAIM_INVALID  # a consumer is one string (or number): not a list, not a header injection
    scopes = scopes_of(claims)
    if scopes is None:
        return CLAIM_INVALID
    plan = header_value(claims.get(policy.plan_claim)) if policy.plan_claim else None
    version = header_value(claims.get(policy.version_claim)) if policy.version_claim else None
    headers = []
    for claim, header in policy.claims.items():
        value = header_value(claims.get(claim))
        if value is not None:
            headers.append((header, value))
    identity = Identity(method, consumer, scopes, plan, None, version, issuer=name, headers=tuple(headers))
    return Verified(identity, expires)
