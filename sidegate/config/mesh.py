"""The ``mesh:`` section: identities, the mesh CA, each service's sidecar, and who may call whom.

A mesh service is a ``services:`` entry whose endpoints are its sidecar's inbound listener;
``mesh.services`` says where that sidecar listens and where the service itself runs. Every
identity is ``spiffe://<trust_domain>/<name>``, the gateway's included. With a mesh, a call
that no ``allow`` rule names is refused by the callee's sidecar (default deny).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BeforeValidator, Field

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


class Mesh(Model):
    trust_domain: Annotated[str, AfterValidator(_trust_domain)] = "sidegate.local"
    ca: Annotated[MeshCa | None, BeforeValidator(_not_null)] = None
    cert_ttl: Annotated[Duration, AfterValidator(_cert_ttl)] = 86400.0
    gateway: Name = "gateway"  # the edge Envoy's identity, the only one whose identity headers count
    services: dict[Name, MeshService] = Field(min_length=1)
    allow: tuple[MeshAllow, ...] = ()

    def identity(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/{name}"

    def callees(self, name: str) -> list[str]:
        """The services ``name`` may call, in the order the rules name them."""
        return list(dict.fromkeys(rule.to for rule in self.allow if rule.from_ == name))

    def callers(self, name: str) -> list[MeshAllow]:
        """The rules that let someone call ``name``."""
        return [rule for rule in self.allow if rule.to == name]


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
