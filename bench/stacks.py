"""The gateway a scenario runs: its Envoy bootstrap, the stub upstream, Redis, keys and tokens.

``BenchStack`` is the real ``sidegate.cli.up.Stack`` (Envoy, the sidecar server with its workers)
with two differences: the compiled bootstrap is post-processed per scenario (no sidecar filters
for the baselines, Envoy's native jwt_authn + local_ratelimit for the physical-limit peer, a
``direct_response`` instead of the upstream) and written as one static file, and Envoy gets a
fixed ``--concurrency``. The stub upstream is a second Envoy (one worker thread) answering every
request itself with a 1 KB JSON order, so that the upstream is never what is being measured.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authz.keyservice import KeyService
from authz.keystore import open_store
from bench.load import BenchError, ensure_tool, free_port
from sidegate import compiler, meshcerts
from sidegate.cli.up import Child, Stack
from sidegate.compiler import mesh as mesh_compiler
from sidegate.config import Gateway, HostPort, UnixSocket
from sidegate.envoy_bin import envoy_binary
from sidegate.probes import envoy_ready, grpc_serving
from sidegate.settings import Settings

ISSUER = "https://issuer.bench.test"
AUDIENCE = "sidegate-bench"
JWT_KID = "bench-1"
CONSUMER = "bench-consumer"
_TYPE = "type.googleapis.com/"
_SIDECAR_FILTERS = ("envoy.filters.http.ext_authz", "envoy.filters.http.ratelimit", "envoy.filters.http.ext_proc")

# --- documents the stub upstream serves and clients send ----------------------------------


def _items(count: int) -> list[dict[str, Any]]:
    return [{"sku": f"SKU-{i:05d}", "name": f"Widget number {i}", "quantity": i % 7 + 1} for i in range(count)]


def order_v2() -> bytes:
    """About 1 KB of JSON in v2's shape: what the stub upstream answers to every request."""
    doc = {
        "id": "ord_7Hq2kR9sLm",
        "customer": {"name": "Ada Lovelace"},
        "state": "PAID",
        "currency": "EUR",
        "items": _items(12),
        "note": "Leave at the door.",
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def order_v1() -> bytes:
    """About 1 KB of JSON in v1's shape: the body the transform scenario POSTs."""
    doc = {
        "customer_name": "Ada Lovelace",
        "state": "paid",
        "currency": "EUR",
        "items": _items(12),
        "note": "Leave at the door.",
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def order_xml() -> bytes:
    """About 1 KB of XML: the body the translate scenario POSTs (an XML client's order)."""
    items = "".join(
        f"<item><sku>{i['sku']}</sku><name>{i['name']}</name><quantity>{i['quantity']}</quantity></item>"
        for i in _items(12)
    )
    return (
        "<order><id>ord_7Hq2kR9sLm</id><customer><name>Ada Lovelace</name></customer><state>PAID</state>"
        f"<currency>EUR</currency><items>{items}</items><note>Leave at the door.</note></order>"
    ).encode()


def v2_order_problem(body: bytes) -> str | None:
    doc = json.loads(body)
    return None if doc.get("customer", {}).get("name") else f"not the upstream's v2 document: {body[:120]!r}"


def v1_order_problem(body: bytes) -> str | None:
    doc = json.loads(body)
    if doc.get("customer_name") == "Ada Lovelace" and doc.get("state") == "paid":
        return None
    return f"response not transformed back to v1: {body[:120]!r}"


def grpc_order_problem(body: bytes) -> str | None:
    doc = json.loads(body)
    return None if doc.get("id") == "o-1" and doc.get("totalCents") == "75" else f"not order o-1: {body[:120]!r}"


def xml_order_problem(body: bytes) -> str | None:
    if body.lstrip().startswith(b"<") and b"Ada Lovelace" in body:
        return None
    return f"response not translated to XML: {body[:120]!r}"


# --- JWTs signed by a key made per run --------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Signer:
    """An RS256 key: its JWKS (inline in the native scenario, served by the stub upstream) and tokens."""

    key: rsa.RSAPrivateKey

    @classmethod
    def new(cls) -> Signer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        jwk = {"kty": "RSA", "kid": JWT_KID, "alg": "RS256", "use": "sig", "n": _b64(n), "e": _b64(e)}
        return json.dumps({"keys": [jwk]})

    def token(self, lifetime: float = 3600.0) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": JWT_KID}
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": CONSUMER,
            "iat": now,
            "exp": now + int(lifetime),
            "scope": "orders:read orders:write",
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"


# --- processes: Redis and the stub upstream -------------------------------------------------


def _redis_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait(child: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not child.ready():
        if not child.alive:
            raise BenchError(f"{child.name} exited at start; see {child.log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"{child.name} not ready after {timeout:.0f}s; see {child.log_path}")
        time.sleep(0.05)


def start_redis(workdir: Path) -> tuple[Child, str]:
    """A real redis-server on a free loopback port, nothing kept on disk; (child, URL)."""
    binary = ensure_tool("redis-server", "redis-server")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    child = Child("redis", argv, workdir / "redis.log", lambda: _redis_ready(port))
    child.start(dict(os.environ))
    _wait(child)
    return child, f"redis://127.0.0.1:{port}/0"


def _route_config(routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "stub", "virtual_hosts": [{"name": "stub", "domains": ["*"], "routes": routes}]}


def _json_direct(match: dict[str, Any], body: str) -> dict[str, Any]:
    return {
        "match": match,
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


def stub_upstream_config(port: int, admin: int, jwks: str) -> dict[str, Any]:
    """An Envoy that answers everything itself: the v2 order for any path, the JWKS at /jwks.json."""
    hcm = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "stub",
        "codec_type": "AUTO",
        "route_config": _route_config(
            [_json_direct({"path": "/jwks.json"}, jwks), _json_direct({"prefix": "/"}, order_v2().decode())]
        ),
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    listener = {
        "name": "stub",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener]},
    }


def start_stub_upstream(workdir: Path, port: int, jwks: str) -> Child:
    """The stub upstream: a second Envoy (one worker thread) on ``port``."""
    admin = free_port()
    path = workdir / "stub-upstream.yaml"
    path.write_text(yaml.safe_dump(stub_upstream_config(port, admin, jwks), sort_keys=False))
    argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "warn", "--disable-hot-restart"]
    child = Child("upstream", argv, workdir / "logs" / "upstream.log", lambda: envoy_ready(f"127.0.0.1:{admin}"))
    child.start(dict(os.environ))
    _wait(child)
    return child


def start_grpc_upstream(workdir: Path, port: int) -> Child:
    """The demo gRPC service (``sidegate demo-grpc``, grpc.aio) on ``port``."""
    argv = [sys.executable, "-m", "sidegate", "demo-grpc", "--port", str(port)]
    child = Child("upstream", argv, workdir / "logs" / "upstream.log", lambda: grpc_serving(f"127.0.0.1:{port}"))
    child.start(dict(os.environ))
    _wait(child)
    return child


def start_upstream(kind: str, workdir: Path, port: int, jwks: str) -> Child | None:
    """The upstream a scenario names, started here; None for ``echo`` (``sidegate up`` starts it) and ``none``."""
    if kind == "stub":
        return start_stub_upstream(workdir, port, jwks)
    if kind == "grpc":
        return start_grpc_upstream(workdir, port)
    return None


# --- the Envoy bootstrap of a scenario ----------------------------------------------------


def _hcm(bootstrap: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                if network_filter["name"] == "envoy.filters.network.http_connection_manager":
                    yield network_filter["typed_config"]


def _routes(bootstrap: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for hcm in _hcm(bootstrap):
        for vhost in hcm["route_config"]["virtual_hosts"]:
            yield from vhost["routes"]


def strip_sidecars(bootstrap: dict[str, Any]) -> None:
    """No sidecar filters, per-route configs or clusters: Envoy with its router alone."""
    for hcm in _hcm(bootstrap):
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in _SIDECAR_FILTERS]
    for route in _routes(bootstrap):
        per_filter = route.get("typed_per_filter_config", {})
        for name in _SIDECAR_FILTERS:
            per_filter.pop(name, None)
        if not per_filter:
            route.pop("typed_per_filter_config", None)
    clusters = bootstrap["static_resources"]["clusters"]
    bootstrap["static_resources"]["clusters"] = [
        c for c in clusters if c["name"] not in compiler.SIDECAR_CLUSTER.values()
    ]


def answer_directly(bootstrap: dict[str, Any]) -> None:
    """Every API route answered by Envoy itself with the upstream's document (no upstream hop)."""
    for route in _routes(bootstrap):
        if "route" in route:
            del route["route"]
            route.update({k: v for k, v in _json_direct({}, order_v2().decode()).items() if k != "match"})


def native_filters(jwks: str) -> list[dict[str, Any]]:
    """Envoy's own jwt_authn (inline JWKS, every path) and local_ratelimit (a bucket never empty)."""
    forever = {"numerator": 100, "denominator": "HUNDRED"}
    return [
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {
                    "bench": {
                        "issuer": ISSUER,
                        "audiences": [AUDIENCE],
                        "local_jwks": {"inline_string": jwks},
                        "claim_to_headers": [{"header_name": "x-consumer-id", "claim_name": "sub"}],
                    }
                },
                "rules": [{"match": {"prefix": "/orders"}, "requires": {"provider_name": "bench"}}],
            },
        },
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench",
                "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"},
                "filter_enabled": {"runtime_key": "bench_rl_enabled", "default_value": forever},
                "filter_enforced": {"runtime_key": "bench_rl_enforced", "default_value": forever},
            },
        },
    ]


def add_native_filters(bootstrap: dict[str, Any], jwks: str) -> None:
    strip_sidecars(bootstrap)
    for hcm in _hcm(bootstrap):
        hcm["http_filters"] = [*native_filters(jwks), *hcm["http_filters"]]


@dataclass
class BenchStack(Stack):
    """The real ``Stack`` with a bootstrap post-processed per scenario and a fixed Envoy concurrency.

    The bootstrap is written as one static file (no file-based xDS: nothing is reloaded here).
    """

    post: Callable[[dict[str, Any]], None] | None = None
    envoy_concurrency: int = 1
    with_sidecars: bool = True

    def sidecar_servers(self) -> dict[HostPort | UnixSocket, list[str]]:
        return super().sidecar_servers() if self.with_sidecars else {}

    def envoy_config(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        bootstrap = compiler.compile_bootstrap(
            self.gateway, state_dir=str(self.state_dir), socket_dir=str(self.settings.sockets)
        )
        if self.post is not None:
            self.post(bootstrap)
        path = self.state_dir / "bench-envoy.yaml"
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        return path

    def _children(self, envoy_yaml: Path) -> list[Child]:
        children = super()._children(envoy_yaml)
        for child in children:
            if child.name == "envoy":
                child.argv += ["--concurrency", str(self.envoy_concurrency)]
        return children


@dataclass
class MeshBenchStack(Stack):
    """The mesh's sidecar Envoys alone, one per service of ``mesh.services``, each with a fixed
    concurrency; with ``direct`` none at all (the call without a mesh). No edge Envoy and no
    Python sidecar: the east-west path holds none. The callee's ``app`` is the stub upstream,
    which the harness starts, so ports are not checked here (the harness picked free ones)."""

    envoy_concurrency: int = 1
    direct: bool = False

    def preflight(self) -> None:
        pass

    def envoy_config(self) -> Path:
        meshcerts.ensure(self.gateway, self.state_dir)
        for service in self._services():
            bootstrap = mesh_compiler.sidecar_bootstrap(self.gateway, service, self.state_dir)
            self._bootstrap(service).write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        return self.state_dir

    def _services(self) -> list[str]:
        return [] if self.direct or self.gateway.mesh is None else list(self.gateway.mesh.services)

    def _bootstrap(self, service: str) -> Path:
        return self.state_dir / f"bench-envoy-{service}.yaml"

    def _children(self, envoy_yaml: Path) -> list[Child]:
        assert self.gateway.mesh is not None
        children = []
        for service in self._services():
            admin = str(self.gateway.mesh.services[service].admin)
            argv = [envoy_binary(), "-c", str(self._bootstrap(service)), "--log-level", "warn", "--disable-hot-restart"]
            argv += ["--concurrency", str(self.envoy_concurrency)]
            ready = functools.partial(envoy_ready, admin)
            children.append(Child(f"envoy-{service}", argv, self._log(f"envoy-{service}"), ready))
        return children


def issue_key(gateway: Gateway, settings: Settings) -> str:
    """A new API key holding every scope the gateway's APIs name, in the store the sidecars read."""
    scopes = sorted({s for api in gateway.apis for scopes in api.auth.scopes.values() for s in scopes})

    async def create() -> str:
        store = open_store(settings.redis_url, settings.state_dir)
        try:
            service = KeyService(store, settings.pepper(), gateway.api_keys, time.time)
            new = await service.create(consumer=CONSUMER, scopes=scopes, actor="sidegate-bench")
        finally:
            await store.close()
        return new.key

    return asyncio.run(create())


def post_processing(*, strip: bool, native: bool, direct: bool, jwks: str) -> Callable[[dict[str, Any]], None]:
    """What a scenario changes in its compiled bootstrap, as one function."""

    def post(bootstrap: dict[str, Any]) -> None:
        if native:
            add_native_filters(bootstrap, jwks)
        elif strip:
            strip_sidecars(bootstrap)
        if direct:
            answer_directly(bootstrap)

    return post
