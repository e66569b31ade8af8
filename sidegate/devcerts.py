"""Development TLS: a local CA and a server certificate for localhost, made with ``cryptography``.

``ensure(directory)`` writes ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` once and
reuses them while the server certificate is valid for more than a day, so a browser or curl
that trusts ``ca.crt`` keeps trusting the stack across runs. Keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevCerts:
    ca_cert: Path
    cert: Path
    key: Path


def write(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Replace ``path`` by a rename (readers never see half a file); 0600 when ``secret``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(common_name: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (P-256, ten years) that signs leaf certificates only."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    lifetime: dt.timedelta,
    now: dt.datetime,
    common_name: str | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a leaf certificate for it, signed by the CA, with ``names`` as its SANs."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        # Critical when the subject is empty (RFC 5280 4.2.1.6), as in a SPIFFE X.509-SVID.
        .add_extension(x509.SubjectAlternativeName(names), critical=common_name is None)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _still_good(cert_path: Path, key_path: Path, now: dt.datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key_path.read_bytes()
    except (OSError, ValueError):
        return False
    return cert.not_valid_after_utc - now > dt.timedelta(days=1)


def ensure(directory: str | Path, now: dt.datetime | None = None) -> DevCerts:
    """Make (or reuse) the development CA and server certificate under ``directory``."""
    root = Path(directory)
    now = now or dt.datetime.now(dt.UTC)
    out = DevCerts(root / "ca.crt", root / "server.crt", root / "server.key")
    if _still_good(out.cert, out.key, now) and out.ca_cert.exists():
        return out

    ca_key, ca_cert = new_ca("Sidegate development CA", now)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(h)) for h in HOSTS[1:]]
    key, cert = issue(
        ca_key,
        ca_cert,
        names=names,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        lifetime=dt.timedelta(days=397),
        now=now,
        common_name="localhost",
    )
    write(root / "ca.key", pem_key(ca_key), secret=True)
    write(out.ca_cert, pem_cert(ca_cert))
    write(out.key, pem_key(key), secret=True)
    write(out.cert, pem_cert(cert))
    return out
