"""The authz decision's values and its pure steps: no grpc and no I/O.

``CheckInput`` is what authz needs of Envoy's CheckRequest, ``Decision`` what it answers, and
``Identity`` who a credential names. The ``Checker`` (``authz.checker``) runs the steps, with
the verifiers (``authz.verifiers``) between them:

    retired(check, api, now)           a version past its sunset → 410, else None
    route(check, api)                  unknown API → 403, anonymous → allow, else None
    missing(api)                       no credential → 401 with the API's challenges
    authorize(api, check, identity)    scopes → allow with identity headers, or 403
    shadow(api, check, denied)         an API in shadow mode lets a denied request through
    deny(denial, api)                  a Denial as a client response
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from authz import errors
from authz.credentials import Credential
from authz.errors import Denial
from sidegate.config import Api
from sidegate.contract import IDENTITY_HEADERS, PIN_HEADER

JSON = "application/json"
REALM = "sidegate"


@dataclass(frozen=True)
class CheckInput:
    """What authz needs of an Envoy CheckRequest."""

    api: str | None
    method: str
    path: str
    headers: Mapping[str, str]
    context: Mapping[str, str] = field(default_factory=dict)  # the route's context extensions
    source: str = ""  # the client's address, read only where authz counts rate limits


@dataclass(frozen=True)
class Identity:
    method: str  # how the caller proved it: api_key, jwt, …
    consumer: str
    scopes: tuple[str, ...] = ()
    plan: str | None = None
    key_id: str | None = None
    version: str | None = None
    issuer: str | None = None  # bearer tokens: the issuer's name in gateway.yaml
    headers: tuple[tuple[str, str], ...] = ()  # bearer tokens: claims mapped to upstream headers

    def __hash__(self) -> int:
        # Computed once: an Identity keys the Checker's decision memo on every request.
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            fields = (self.method, self.consumer, self.scopes, self.plan, self.key_id, self.version, self.issuer)
            cached = hash((*fields, self.headers))
            object.__setattr__(self, "_hash", cached)
        return cached


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200
    code: str = "ok"
    # Set on the upstream request (allow) or on the client response (deny).
    headers: tuple[tuple[str, str], ...] = ()
    # Removed from the upstream request on allow: forged identity headers, the credential.
    remove: tuple[str, ...] = ()
    remove_query: tuple[str, ...] = ()
    body: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    identity: Identity | None = None
    # Added to the client's response on allow (rate-limit fields when authz limits in-process).
    response_headers: tuple[tuple[str, str], ...] = ()
    # An API in shadow mode: the status authz would have answered (0 when it let it through).
    shadow_status: int = 0


def _schemes(api: Api | None, denial: Denial, scheme: str | None) -> list[str]:
    """The auth schemes to challenge with: the one the credential used, else every one accepted."""
    if scheme is not None:
        return [scheme]
    if denial.error == "invalid_api_key":
        return ["ApiKey"]
    if denial.error == "invalid_token":
        return ["Bearer"]
    accepted = []
    if api is not None and api.auth.jwt:
        accepted.append("Bearer")
    if api is not None and api.auth.api_key:
        accepted.append("ApiKey")
    return accepted or ["Bearer"]


def _challenge(api: Api | None, denial: Denial, extra: str = "", scheme: str | None = None) -> str:
    params = [f'realm="{REALM}"']
    if denial not in errors.NO_CREDENTIAL:  # RFC 6750 §3.1: no error when no credential came
        params.append(f'error="{denial.error}"')
    if extra:
        params.append(extra)
    schemes = _schemes(api, denial, scheme)
    if len(schemes) > 1:  # one challenge per scheme, realm only (RFC 9110 §11.6.1)
        return ", ".join(f'{name} realm="{REALM}"' for name in schemes)
    return f"{schemes[0]} " + ", ".join(params)


def deny(denial: Denial, api: Api | None = None, *, scheme: str | None = None, **details: str) -> Decision:
    """A denial as a client response: JSON body, and ``WWW-Authenticate`` on 401 and scope 403s.

    ``scheme`` names the challenge's auth scheme when the credential's kind is known.
    """
    headers = [("content-type", JSON)]
    if denial.http_status == 401:
        headers.append(("www-authenticate", _challenge(api, denial, scheme=scheme)))
    elif denial is errors.INSUFFICIENT_SCOPE:
        extra = f'scope="{details.get("scope", "")}"'
        headers.append(("www-authenticate", _challenge(api, denial, extra, scheme=scheme)))
    body = json.dumps({"error": denial.error, "reason": denial.code, "message": denial.message, **details}) + "\n"
    return Decision(False, denial.http_status, denial.code, tuple(headers), body=body)


ALLOW_ANONYMOUS = Decision(
    True,
    code="anonymous",
    headers=(("x-auth-method", "anonymous"),),
    remove=tuple(h for h in IDENTITY_HEADERS if h != "x-auth-method"),
    metadata={"consumer": "anonymous", "plan": "anonymous", "auth_method": "anonymous"},
)


def retired(check: CheckInput, api: Api | None, now: float) -> Decision | None:
    """410 for a version whose sunset (in the route's context) has passed, else None.

    The compiler answers 410 itself for sunsets already past when it ran; this is for the
    ones that pass while the config is running.
    """
    sunset = check.context.get("sunset")
    if not sunset or now < dt.datetime.fromisoformat(sunset).timestamp():
        return None
    version = check.context.get("version", "")
    return deny(errors.API_VERSION_GONE, api, version=version, successor=check.context.get("successor", ""))


def route(check: CheckInput, api: Api | None) -> Decision | None:
    """Decisions that need no credential: an unknown API, an anonymous one."""
    if api is None:
        return deny(errors.UNKNOWN_API)
    if api.auth.anonymous:
        return ALLOW_ANONYMOUS
    return None


def missing(api: Api) -> Decision:
    if api.auth.api_key and api.auth.jwt:
        return deny(errors.MISSING_CREDENTIALS, api)  # challenges with both schemes
    if api.auth.jwt:
        return deny(errors.INVALID_TOKEN["missing"], api)
    return deny(errors.INVALID_API_KEY["missing"] if api.auth.api_key else errors.MISSING_CREDENTIALS, api)


def authorize(
    api: Api, check: CheckInput, identity: Identity, credential: Credential, strip: tuple[str, ...] = ()
) -> Decision:
    """Scopes, then the headers and metadata the upstream and later filters get.

    ``strip``: more headers only authz may set (``Gateway.claim_headers``), removed unless set here.
    """
    held = set(identity.scopes)
    lacking = [scope for scope in api.auth.required_scopes(check.method) if scope not in held]
    if lacking:
        scheme = "ApiKey" if identity.method == "api_key" else "Bearer"
        return deny(errors.INSUFFICIENT_SCOPE, api, scheme=scheme, scope=" ".join(lacking))
    headers = [("x-consumer-id", identity.consumer), ("x-auth-method", identity.method)]
    headers.append(("x-auth-scopes", " ".join(identity.scopes)))
    if identity.plan:
        headers.append(("x-consumer-plan", identity.plan))
    if identity.key_id:
        headers.append(("x-auth-key-id", identity.key_id))
    if identity.version:
        # The consumer's pin: Envoy re-matches the route (clear_route_cache) to pick it.
        headers.append((PIN_HEADER, identity.version))
    headers.extend(identity.headers)
    setting = {name for name, _ in headers}
    remove = [h for h in (*IDENTITY_HEADERS, *strip) if h not in setting]
    if credential.header:
        remove.append(credential.header)
    if api.auth.jwt and credential.header != "authorization":
        remove.append("authorization")  # a bearer token is the gateway's, never the upstream's
    elif credential.header != "authorization" and _scheme(check.headers, "ApiKey"):
        remove.append("authorization")  # a second copy of the key, in the ApiKey scheme
    metadata = {
        "consumer": identity.consumer,
        "plan": identity.plan or "none",
        "auth_method": identity.method,
        "key_id": identity.key_id or "",
        "version": identity.version or "",
    }
    return Decision(
        True,
        code="ok",
        headers=tuple(headers),
        remove=tuple(remove),
        remove_query=_query_copies(api, check, credential),
        metadata=metadata,
        identity=identity,
    )


def authorize_shape(check: CheckInput, credential: Credential) -> tuple[str, str | None, str | None, bool, bool]:
    """What ``authorize`` reads of a request besides the API, the identity and ``strip``: equal
    shapes (with those equal) give equal decisions."""
    return check.method, credential.header, credential.query, "?" in check.path, _scheme(check.headers, "ApiKey")


def _scheme(headers: Mapping[str, str], scheme: str) -> bool:
    return headers.get("authorization", "").strip().lower().startswith(scheme.lower() + " ")


def _query_copies(api: Api, check: CheckInput, credential: Credential) -> tuple[str, ...]:
    """The query parameters to strip: the one the key came in, and the API's key parameter if the
    client also put a copy there."""
    names = [credential.query] if credential.query else []
    if api.auth.api_key_query and "?" in check.path and api.auth.api_key_query not in names:
        names.append(api.auth.api_key_query)
    return tuple(names)


def shadow(api: Api, check: CheckInput, denied: Decision, credential: Credential | None) -> Decision:
    """A denial on an API in shadow mode, turned into a pass: the request goes upstream with no
    identity (every identity header removed) and without its credential, and the decision says
    what authz would have answered."""
    remove = [*IDENTITY_HEADERS]
    if credential is not None and credential.header:
        remove.append(credential.header)
    if api.auth.jwt and "authorization" not in remove:
        remove.append("authorization")
    return Decision(
        True,
        code=denied.code,
        remove=tuple(remove),
        remove_query=_query_copies(api, check, credential) if credential is not None else (),
        metadata=SHADOW_METADATA,
        shadow_status=denied.status,
    )


SHADOW_METADATA = {"consumer": "anonymous", "plan": "anonymous", "auth_method": "none"}
