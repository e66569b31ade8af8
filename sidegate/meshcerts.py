"""Mesh identities: the mesh CA and each workload's short-lived certificate, as Envoy SDS files.

Every identity (each mesh service, and the gateway) gets a P-256 key and a certificate whose one
URI SAN is ``spiffe://<trust_domain>/<name>``, valid for ``mesh.cert_ttl``. They are written as
two SDS files under ``<state_dir>/mesh/<name>/``: ``identity.yaml`` (the certificate and its key,
mode 0600) and ``trust.yaml`` (the CA certificate that peers must chain to). Envoy watches both
files and swaps a certificate for new handshakes when a file is replaced, so a renewal drops no
connection. ``cert.pem`` beside them is the public certificate, for people and tests.

A certificate is renewed when less than half of its lifetime is left (as Istio's agent does), or
when the CA that signed it is no longer the mesh CA. The CA is the operator's (``mesh.ca``) or a
development CA made once under ``<state_dir>/mesh/``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidegate import devcerts
from sidegate.config import Gateway, Mesh
from sidegate.errors import ConfigError, StackError

# Names of SDS resources, not secrets themselves.
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
IDENTITY_SECRET = "mesh_identity"  # noqa: S105
TRUST_SECRET = "mesh_trust"  # noqa: S105
POLL_INTERVAL = 5.0  # seconds between looks at the certificates' ages under --watch


def mesh_dir(state_dir: Path) -> Path:
    return state_dir / "mesh"


def identity_dir(state_dir: Path, name: str) -> Path:
    """Where the SDS files of identity ``name`` live."""
    return mesh_dir(state_dir) / name


def identities(mesh: Mesh) -> list[str]:
    """Every identity that needs a certificate: the gateway, then each mesh service."""
    return [mesh.gateway, *mesh.services]


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: bytes


def load_ca(gateway: Gateway, state_dir: Path) -> Ca:
    """The mesh CA: the operator's files, or the development CA (made on first use)."""
    mesh = gateway.mesh
    assert mesh is not None
    if mesh.ca is not None:
        cert_path, key_path = gateway.base / mesh.ca.cert, gateway.base / mesh.ca.key
    else:
        cert_path, key_path = mesh_dir(state_dir) / "ca.crt", mesh_dir(state_dir) / "ca.key"
        if not (cert_path.exists() and key_path.exists()):
            new_key, new_cert = devcerts.new_ca("Sidegate mesh development CA", dt.datetime.now(dt.UTC))
            devcerts.write(key_path, devcerts.pem_key(new_key), secret=True)
            devcerts.write(cert_path, devcerts.pem_cert(new_cert))
    try:
        pem = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise StackError(f"mesh CA: cannot load {cert_path} and {key_path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StackError(f"mesh CA: {key_path} must hold an EC key (P-256)")
    return Ca(key, cert, pem)


def sds(name: str, secret: dict[str, Any]) -> str:
    """One SDS file: a discovery response holding the one secret ``name``."""
    return yaml.safe_dump({"resources": [{"@type": SECRET_TYPE, "name": name, **secret}]}, sort_keys=False)


def _needs_renewal(folder: Path, ca: Ca, now: dt.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        (folder / "identity.yaml").stat()
        trusted = (folder / "trust.yaml").read_text()
    except (OSError, ValueError):
        return True
    if cert.issuer != ca.cert.subject or trusted != _trust(ca):
        return True  # the mesh CA changed: a new chain, and peers must trust the new CA
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime / 2


def _trust(ca: Ca) -> str:
    return sds(TRUST_SECRET, {"validation_context": {"trusted_ca": {"inline_string": ca.pem.decode()}}})


def issue(mesh: Mesh, name: str, ca: Ca, state_dir: Path, now: dt.datetime) -> x509.Certificate:
    """Issue identity ``name`` a new certificate and write its SDS files (trust first)."""
    key, cert = devcerts.issue(
        ca.key,
        ca.cert,
        names=[x509.UniformResourceIdentifier(mesh.identity(name))],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        lifetime=dt.timedelta(seconds=mesh.cert_ttl),
        now=now,
    )
    folder = identity_dir(state_dir, name)
    devcerts.write(folder / "trust.yaml", _trust(ca).encode())
    chain = devcerts.pem_cert(cert).decode()
    identity = {
        "tls_certificate": {
            "certificate_chain": {"inline_string": chain},
            "private_key": {"inline_string": devcerts.pem_key(key).decode()},
        }
    }
    devcerts.write(folder / "identity.yaml", sds(IDENTITY_SECRET, identity).encode(), secret=True)
    devcerts.write(folder / "cert.pem", chain.encode())
    return cert


def ensure(
    gateway: Gateway,
    state_dir: Path,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
    only: str | None = None,
) -> list[str]:
    """Issue every identity (or ``only`` that one, as in a Kubernetes pod) that has no
    certificate, or one past half its life (all with ``force``); the names renewed."""
    mesh = gateway.mesh
    if mesh is None:
        return []
    if only is not None and only not in identities(mesh):
        raise StackError(f"not a mesh identity: {only!r} (known: {', '.join(identities(mesh))})")
    now = now or dt.datetime.now(dt.UTC)
    ca = load_ca(gateway, state_dir)
    renewed = []
    for name in [only] if only is not None else identities(mesh):
        if force or _needs_renewal(identity_dir(state_dir, name), ca, now):
            issue(mesh, name, ca, state_dir, now)
            renewed.append(name)
    return renewed


def watch(load: Callable[[], Gateway], state_dir: Path, stopping: Callable[[], bool], only: str | None = None) -> None:
    """Renew certificates as they age, until ``stopping()``; ``load`` reads the config in force
    (a bad edit keeps the last good one)."""
    gateway = load()
    while not stopping():
        try:
            gateway = load()
        except ConfigError as exc:  # a bad edit must not stop renewals: keep the last good config
            print(f"sidegate mesh: config not reloaded: {exc.errors[0]}", flush=True)
        for name in ensure(gateway, state_dir, only=only):
            print(f"sidegate mesh: renewed the certificate of {name}", flush=True)
        deadline = time.monotonic() + POLL_INTERVAL
        while time.monotonic() < deadline and not stopping():
            time.sleep(0.2)
