"""The ``mesh:`` section: identities, the mesh CA, each service's sidecar, and who may call whom.

A mesh service is a ``services:`` entry whose endpoints are its sidecar's inbound listener;
``mesh.services`` says where that sidecar listens and where the service itself runs. Every
identity is ``spiffe://<trust_domain>/<name>``, the gateway's included. With a mesh, a call
that no ``allow`` rule names is refused by the callee's sidecar (default deny). ``limits``
count each calling service's calls in the ratelimit sidecar, and ``authz`` sends the calls that
carry an end user's credential to the authz sidecar, as an edge API's ``auth`` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from sidegate.config.policy import Auth, RateLimitRule
from sidegate.config.positions import KeyPath
from sidegate.config.values import Duration, HostPort, Method, Model, Name, _not_null

if TYPE_CHECKING:
    from sidegate.config.model import Gateway

MIN_CERT_TTL = 60.0  # a shorter workload certificate would be renewed faster than a poll notices


def _trust_domain(value: str) -> str:
    # SPIFFE: the trust domain is lower-case letters, digits, '.', '-' and '_'.
    if not value or len(value) > 255 or any(c not in "abcdefghijklmnopqrstuvwxyz0123456789.-_" for c in value):
        raise ValueError(f"not a SPIFFE trust domain: {value!r} (lower-case letters, digits, '.', '-', '_')")
    return value


def _cert_ttl(value: float) -> float:
    if value < MIN_CERT_TTL:
        raise ValueError("must be at least 1m")
    return value


def _mesh_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/': {value!r}")
    return value


class MeshCa(Model):
    """An operator's CA: its certificate and key files. Without one, ``sidegate`` makes a
    development CA under the state dir."""

    cert: str
    key: str


class MeshService(Model):
    """Where one service's sidecar Envoy listens, and where the service itself runs."""

    app: HostPort  # the service itself, plain HTTP; only its sidecar calls it
    inbound: HostPort  # the sidecar's mTLS listener (the service's endpoints point here)
    outbound: HostPort  # where the service calls the others, naming one in the Host header
    admin: HostPort  # the sidecar Envoy's admin (loopback)


class MeshAllow(Model):
    """One rule: ``from`` may call ``to`` on these path prefixes and methods (all when empty)."""

    from_: Name = Field(alias="from")
    to: Name
    paths: tuple[Annotated[str, AfterValidator(_mesh_path)], ...] = ()
    methods: tuple[Method, ...] = ()


class MeshLimit(RateLimitRule):
    """A limit on the calls to ``to``, counted apart for each calling service (or only for
    ``from``'s calls when it is named), by the ratelimit sidecar with the edge's limits."""

    from_: Name | None = Field(default=None, alias="from")
    to: Name


class MeshAuthz(Auth):
    """What an end user's credential on a call to this service must be: the issuers (``jwt``) or
    an API key, and the scopes, as an edge API's ``auth``. A call that carries one (an
    ``authorization`` header, or the API-key header with ``api_key``) is checked by the authz
    sidecar, and the service gets the end user's identity headers. A call without one is the
    calling service acting for itself: ``allow`` alone decides, unless ``required``."""

    required: bool = False  # every call must carry an end user's credential (401 otherwise)

    @model_validator(mode="after")
    def _a_credential(self) -> MeshAuthz:
        if self.anonymous or self.shadow or self.api_key_query is not None:
            raise ValueError("mesh authz takes jwt, api_key, scopes and required")
        if not (self.jwt or self.api_key):
            raise ValueError("name the credential a call may carry: jwt issuers or api_key: true")
        return self


class Mesh(Model):
    trust_domain: Annotated[str, AfterValidator(_trust_domain)] = "sidegate.local"
    ca: Annotated[MeshCa | None, BeforeValidator(_not_null)] = None
    cert_ttl: Annotated[Duration, AfterValidator(_cert_ttl)] = 86400.0
    gateway: Name = "gateway"  # the edge Envoy's identity, the only one whose identity headers count
    services: dict[Name, MeshService] = Field(min_length=1)
    allow: tuple[MeshAllow, ...] = ()
    limits: tuple[MeshLimit, ...] = ()
    authz: dict[Name, MeshAuthz] = Field(default_factory=dict)  # by called service

    def identity(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"

    def callees(self, name: str) -> list[str]:
        """The services ``name`` may call, in the order the rules name them."""
        return list(dict.fromkeys(rule.to for rule in self.allow if rule.from_ == name))

    def callers(self, name: str) -> list[MeshAllow]:
        """The rules that let someone call ``name``."""
        return [rule for rule in self.allow if rule.to == name]

    def limits_of(self, name: str) -> list[MeshLimit]:
        """The limits on the calls to ``name``."""
        return [limit for limit in self.limits if limit.to == name]


def mesh_references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Mesh names that point nowhere: every mesh service is a service, rules name known ones."""
    mesh = gateway.mesh
    if mesh is None:
        return
    if mesh.gateway in mesh.services:
        yield ("mesh", "gateway"), f"{mesh.gateway!r} is also a mesh service: the gateway needs an identity of its own"
    for name in mesh.services:
        if name not in gateway.services:
            known = ", ".join(sorted(gateway.services))
            yield ("mesh", "services", name), f"not in services (known: {known}): its callers reach it there"
    identities = set(mesh.services) | {mesh.gateway}
    for i, rule in enumerate(mesh.allow):
        if rule.from_ not in identities:
            known = ", ".join(sorted(identities))
            yield ("mesh", "allow", i, "from"), f"unknown identity {rule.from_!r} (known: {known})"
        if rule.to not in mesh.services:
            known = ", ".join(sorted(mesh.services))
            yield ("mesh", "allow", i, "to"), f"not a mesh service: {rule.to!r} (known: {known})"
        if rule.to == rule.from_:
            yield ("mesh", "allow", i, "to"), "a service calls itself without its sidecar"
    for i, limit in enumerate(mesh.limits):
        if limit.to not in mesh.services:
            known = ", ".join(sorted(mesh.services))
            yield ("mesh", "limits", i, "to"), f"not a mesh service: {limit.to!r} (known: {known})"
        elif limit.from_ is not None and not any(r.from_ == limit.from_ for r in mesh.callers(limit.to)):
            yield ("mesh", "limits", i, "from"), f"no allow rule lets {limit.from_!r} call {limit.to!r}"
    for name, authz in mesh.authz.items():
        if name not in mesh.services:
            known = ", ".join(sorted(mesh.services))
            yield ("mesh", "authz", name), f"not a mesh service: {name!r} (known: {known})"
        for j, issuer in enumerate(authz.jwt):
            if issuer not in gateway.issuers:
                known = ", ".join(sorted(gateway.issuers)) or "none defined"
                yield ("mesh", "authz", name, "jwt", j), f"unknown issuer {issuer!r} (known: {known})"
