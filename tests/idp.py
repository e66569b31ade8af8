"""A small, real identity provider for the tests: an HTTP server on loopback, in a thread.

It serves what authz reads of an OAuth 2.0 / OIDC provider, from keys made with
``cryptography`` (RSA, EC P-256/P-384, Ed25519):

    GET  /.well-known/openid-configuration   discovery (issuer, jwks_uri, token, introspection)
    GET  /jwks                               the published keys, with Cache-Control: max-age
    POST /token                              client credentials (RFC 6749 §4.4): a JWT or an opaque token
    POST /introspect                         RFC 7662, for the resource server's client credentials
    GET  /attacker/...                       what a forged jku/x5u would point at: never to be fetched
    GET  /moved                              a redirect to /jwks (a client must not follow it)

Every request is counted by path (``hits``), so tests can assert what was fetched — and what
never was. ``stop()``/``start()`` take it down and bring it back on the same port; ``rotate``
publishes a new key. ``mint`` signs any header and claims with any of its keys (or a foreign
one), which is how the attack tokens are made.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

ALGORITHMS = get_default_algorithms()
RESOURCE_CLIENT = ("sidegate-authz", "introspection-secret-for-tests")  # authz's own client credentials


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value: Mapping[str, Any] | bytes) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    return b64(raw)


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(ALGORITHMS[self.alg].to_jwk(self.private.public_key()))  # type: ignore[attr-defined]
        jwk.update(kid=self.kid, use="sig", alg=self.alg)
        return jwk

    def sign(self, signing_input: bytes) -> bytes:
        return bytes(ALGORITHMS[self.alg].sign(signing_input, self.private))


def new_key(alg: str, kid: str | None = None) -> SigningKey:
    """A fresh key for ``alg`` (RS*/PS*: RSA 2048, ES256/ES384: P-256/P-384, EdDSA: Ed25519)."""
    private: Any
    if alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(alg)
    return SigningKey(kid or f"{alg.lower()}-{secrets.token_hex(4)}", alg, private)


def compact(header: Mapping[str, Any], claims: Mapping[str, Any] | bytes, sign: Any = None) -> str:
    """``header.payload.signature``; ``sign(signing_input) -> bytes`` or None for no signature."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = sign(signing_input.encode()) if sign is not None else b""
    return f"{signing_input}.{b64(signature)}"


def hs_sign(secret: bytes, alg: str = "HS256") -> Any:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return lambda data: hmac.new(secret, data, digest).digest()


class IdP:
    def __init__(self, *, audience: str = "orders-api", max_age: int = 300, algs: tuple[str, ...] = ("RS256",)) -> None:
        self.audience = audience
        self.max_age = max_age
        self.hits: Counter[str] = Counter()
        self.keys: dict[str, SigningKey] = {}
        self.published: list[str] = []
        self.active_kid = ""
        for alg in algs:
            key = self.add_key(alg)
            self.active_kid = self.active_kid or key.kid
        self.clients: dict[str, tuple[str, str]] = {}  # client_id → (secret, token format)
        self.opaque: dict[str, dict[str, Any]] = {}  # opaque token → its introspection answer
        self.introspection_status = 200
        self.delay = 0.0  # seconds every answer waits (a slow IdP)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> IdP:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Nothing listens on the port any more (until ``start``)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.issuer + path

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.hits)

    # -- keys ----------------------------------------------------------------------------------

    def add_key(self, alg: str, *, publish: bool = True, kid: str | None = None) -> SigningKey:
        key = new_key(alg, kid)
        self.keys[key.kid] = key
        if publish:
            self.published.append(key.kid)
        return key

    def rotate(self, alg: str = "RS256", *, retire_old: bool = False) -> SigningKey:
        """Publish a new key and sign with it from now on; optionally unpublish the old one."""
        old = self.active_kid
        key = self.add_key(alg)
        self.active_kid = key.kid
        if retire_old and old in self.published:
            self.published.remove(old)
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.keys[kid].public_jwk for kid in self.published]}

    # -- tokens ----------------------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Valid access-token claims for now (``None`` values remove a claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "svc-reporting",
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": secrets.token_hex(8),
            "scope": "orders:read",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        key: SigningKey | None = None,
        kid: str | None = "",
        alg: str | None = None,
        typ: str | None = "at+jwt",
        **header: Any,
    ) -> str:
        """A JWS of ``claims`` (default: valid ones) signed by ``key`` (default: the active key).

        ``kid=""`` means the signing key's kid, None leaves it out; ``alg`` overrides the
        header's alg (not the signature); ``header`` adds fields (jku, x5u, jwk, crit, …).
        """
        key = key or self.keys[self.active_kid]
        head: dict[str, Any] = {"alg": alg or key.alg}
        if typ is not None:
            head["typ"] = typ
        if kid is not None:
            head["kid"] = kid or key.kid
        head.update(header)
        return compact(head, dict(claims) if claims is not None else self.claims(), key.sign)

    def register_client(self, client_id: str, secret: str, token_format: str = "jwt") -> None:
        self.clients[client_id] = (secret, token_format)

    def issue(self, client_id: str, scope: str) -> str:
        """What /token would give ``client_id`` (for tests that do not go through HTTP)."""
        fmt = self.clients[client_id][1]
        claims = self.claims(sub=client_id, scope=scope, client_id=client_id)
        if fmt == "jwt":
            return self.mint(claims)
        token = secrets.token_urlsafe(32)
        self.opaque[token] = {"active": True, "token_type": "Bearer", **claims}
        return token

    def revoke(self, token: str) -> None:
        self.opaque[token] = {"active": False}

    def introspect(self, token: str) -> dict[str, Any]:
        answer = self.opaque.get(token, {"active": False})
        if answer.get("active") and answer.get("exp", 0) <= time.time():
            return {"active": False}
        return answer

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.url("/jwks"),
            "token_endpoint": self.url("/token"),
            "introspection_endpoint": self.url("/introspect"),
            "grant_types_supported": ["client_credentials"],
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys.values()}),
        }


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except ValueError:
        return None
    return unquote_plus(user), unquote_plus(password)


def _handler(idp: IdP) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: stop() really stops it

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _count(self) -> str:
            path = self.path.partition("?")[0]
            with idp._lock:
                idp.hits[path] += 1
            return path

        def _send(self, status: int, body: object, headers: Mapping[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("content-length") or 0)
            return dict(parse_qsl(self.rfile.read(length).decode()))

        def do_GET(self) -> None:
            path = self._count()
            time.sleep(idp.delay)
            if path == "/.well-known/openid-configuration":
                self._send(200, idp.discovery())
            elif path == "/jwks":
                self._send(200, idp.jwks(), {"cache-control": f"public, max-age={idp.max_age}"})
            elif path == "/moved":
                self.send_response(302)
                self.send_header("location", idp.url("/jwks"))
                self.send_header("content-length", "0")
                self.end_headers()
            elif path.startswith("/attacker/"):
                # What a forged jku would find: the attacker's keys. Counted; must stay at zero.
                self._send(200, {"keys": []})
            else:
                self._send(404, {"error": "not_found"})

        def do_POST(self) -> None:
            path = self._count()
            time.sleep(idp.delay)
            form = self._form()
            if path == "/token":
                client = _basic(self.headers.get("authorization")) or (
                    form.get("client_id", ""),
                    form.get("client_secret", ""),
                )
                known = idp.clients.get(client[0])
                if form.get("grant_type") != "client_credentials":
                    self._send(400, {"error": "unsupported_grant_type"})
                elif known is None or not hmac.compare_digest(known[0], client[1]):
                    self._send(401, {"error": "invalid_client"})
                else:
                    token = idp.issue(client[0], form.get("scope", ""))
                    self._send(200, {"access_token": token, "token_type": "Bearer", "expires_in": 600})
            elif path == "/introspect":
                if _basic(self.headers.get("authorization")) != RESOURCE_CLIENT:
                    self._send(401, {"error": "invalid_client"})
                elif idp.introspection_status != 200:
                    self._send(idp.introspection_status, {"error": "temporarily_unavailable"})
                else:
                    self._send(200, idp.introspect(form.get("token", "")))
            else:
                self._send(404, {"error": "not_found"})

    return Handler
