"""Problems between sections that no single field can see, as ``(key path, problem)`` pairs."""

from __future__ import annotations

from collections.abc import Iterator

from sidegate.config.mesh import mesh_references
from sidegate.config.model import (
    HMAC_ALGORITHMS,
    Gateway,
)
from sidegate.config.positions import (
    KeyPath,
)


def references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Problems between sections that no single field can see: (key path, problem)."""
    names: set[str] = set()
    bound: set[tuple[str, int]] = set()
    for i, listener in enumerate(gateway.listeners):
        if listener.name in names:
            yield ("listeners", i, "name"), f"duplicate listener name {listener.name!r}"
        if (listener.address, listener.port) in bound:
            yield ("listeners", i, "port"), f"port {listener.port} is used by an earlier listener"
        names.add(listener.name)
        bound.add((listener.address, listener.port))
    names = set()
    routes: set[tuple[str, tuple[str, ...]]] = set()
    for i, api in enumerate(gateway.apis):
        if api.name in names:
            yield ("apis", i, "name"), f"duplicate api name {api.name!r}"
        names.add(api.name)
        if api.service not in gateway.services:
            known = ", ".join(sorted(gateway.services))
            yield ("apis", i, "service"), f"unknown service {api.service!r} (known: {known})"
        route = (api.match.prefix, tuple(sorted(api.match.methods)))
        if route in routes:
            yield ("apis", i, "match"), f"same prefix and methods as an earlier api: {api.match.prefix}"
        routes.add(route)
    yield from _translation_references(gateway)
    yield from _ratelimit_references(gateway)
    yield from _issuer_references(gateway)
    yield from _version_references(gateway)
    yield from _strip_references(gateway)
    yield from mesh_references(gateway)


def _strip_references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Envoy strips identity headers before authz reads the request: never a credential."""
    for name in dict.fromkeys((gateway.api_keys.header, "authorization", "x-request-id", "traceparent")):
        if gateway.strips(name):
            yield (
                ("identity_headers",),
                f"{name} carries credentials or request ids that authz reads: keep it (or use another api_keys.header)",
            )


def _translation_references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Translations the service cannot take. Whether the gRPC routes match their descriptors is
    extproc's check (``extproc.grpc_translate.problems``), run by ``sidegate check`` and extproc."""
    for i, api in enumerate(gateway.apis):
        spec, service = api.translate, gateway.services.get(api.service)
        if spec is None or service is None:
            continue
        at: KeyPath = ("apis", i, "translate")
        if spec.grpc is None:
            if service.protocol == "grpc":
                yield (*at, "xml"), f"service {api.service!r} speaks gRPC: translate it with grpc, not xml"
            continue
        if service.protocol != "grpc":
            yield (
                (*at, "grpc"),
                f"service {api.service!r} has protocol {service.protocol}: a gRPC translation needs protocol: grpc",
            )


def _version_references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Contradictions among versions: unknown names, backward chains, two versions on one upstream."""
    prefixes = {api.match.prefix.rstrip("/") for api in gateway.apis}
    for i, api in enumerate(gateway.apis):
        if api.versioning is None:
            continue
        names = list(api.versions)
        at = ("apis", i, "versions")
        if api.versioning.default not in api.versions:
            yield (
                ("apis", i, "versioning", "default"),
                f"unknown version {api.versioning.default!r} (known: {', '.join(names)})",
            )
        upstreams: dict[tuple[str, str], str] = {}
        for name, version in api.versions.items():
            newer = api.newer(name)
            if version.served_by is not None:
                if version.served_by not in newer:
                    yield (*at, name, "served_by"), f"must name a newer version ({', '.join(newer) or 'none is newer'})"
                elif api.versions[version.served_by].served_by is not None:
                    yield (*at, name, "served_by"), f"{version.served_by} is itself served_by another version"
                if version.service is not None or version.prefix is not None:
                    yield (*at, name, "served_by"), "a version served_by another has no service or prefix of its own"
            else:
                service = version.service or api.service
                if service not in gateway.services:
                    yield (
                        (*at, name, "service"),
                        f"unknown service {service!r} (known: {', '.join(sorted(gateway.services))})",
                    )
                upstream = (service, version.prefix or api.match.prefix)
                if upstream in upstreams:
                    yield (
                        (*at, name),
                        (
                            f"same upstream as {upstreams[upstream]} ({upstream[0]} {upstream[1]}): "
                            "two versions on one prefix; serve one through the other with served_by and changes"
                        ),
                    )
                upstreams[upstream] = name
            if version.successor is not None and version.successor not in newer:
                yield (*at, name, "successor"), f"must name a newer version ({', '.join(newer) or 'none is newer'})"
            if version.changes and not newer:
                yield (*at, name, "changes"), "the newest version has no next version to change into"
        if api.versioning.path:
            for name in names:
                path = f"/{name}{api.match.prefix.rstrip('/')}"
                if path in prefixes:
                    yield (*at, name), f"its path {path} is also the prefix of another api"


def _issuer_references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Issuers that cannot check a token, claim headers that collide, APIs naming unknown issuers."""
    seen: dict[str, str] = {}
    for name, issuer in gateway.issuers.items():
        at = ("issuers", name)
        if issuer.issuer in seen:
            yield (*at, "issuer"), f"same issuer as issuers.{seen[issuer.issuer]}: tokens are matched by this URL"
        seen.setdefault(issuer.issuer, name)
        if issuer.discovery and issuer.jwks_uri is not None:
            yield (*at, "jwks_uri"), "discovery: true finds the jwks_uri: give one or the other"
        signed = [alg for alg in issuer.algorithms if alg not in HMAC_ALGORITHMS]
        shared = [alg for alg in issuer.algorithms if alg in HMAC_ALGORITHMS]
        if signed and not (issuer.discovery or issuer.jwks_uri) and issuer.introspection is None:
            yield (*at, "algorithms"), f"{signed[0]} needs the issuer's keys: set discovery: true or jwks_uri"
        if issuer.introspection is not None and issuer.introspection.endpoint is None and not issuer.discovery:
            yield (
                (*at, "introspection"),
                "no endpoint: give introspection.endpoint, or discovery: true to find it",
            )
        if shared and issuer.shared_secret_env is None:
            yield (
                (*at, "algorithms"),
                f"{shared[0]} needs shared_secret_env: the environment variable holding the shared secret",
            )
        if issuer.shared_secret_env is not None and not shared:
            yield (*at, "shared_secret_env"), "only used with HS256, HS384 or HS512 in algorithms"
        targets: dict[str, str] = {}
        for claim, header in issuer.claims.items():
            if header in targets:
                yield (*at, "claims", claim), f"{header} already carries claim {targets[header]!r}"
            elif header == gateway.api_keys.header:
                yield (*at, "claims", claim), f"{header} is the API-key header (api_keys.header)"
            targets.setdefault(header, claim)
    for i, api in enumerate(gateway.apis):
        listed: set[str] = set()
        for j, name in enumerate(api.auth.jwt):
            if name not in gateway.issuers:
                known = ", ".join(sorted(gateway.issuers)) or "none defined"
                yield ("apis", i, "auth", "jwt", j), f"unknown issuer {name!r} (known: {known})"
            elif name in listed:
                yield ("apis", i, "auth", "jwt", j), f"issuer {name!r} is listed twice"
            listed.add(name)
        introspected = [n for n in listed if n in gateway.issuers and gateway.issuers[n].introspection]
        if len(introspected) > 1:
            yield (
                ("apis", i, "auth", "jwt"),
                "at most one issuer with introspection per API: an opaque token names no issuer, "
                f"so it would be sent to each ({', '.join(sorted(introspected))})",
            )


def _ratelimit_references(gateway: Gateway) -> Iterator[tuple[KeyPath, str]]:
    """Rate-limit problems that span sections: consumers on anonymous APIs, unrouted methods, …"""
    rl = gateway.ratelimit
    if rl.default_plan is not None and rl.default_plan not in gateway.plans:
        known = ", ".join(sorted(gateway.plans)) or "none defined"
        yield ("ratelimit", "default_plan"), f"unknown plan {rl.default_plan!r} (known: {known})"
    if rl.redis_timeout >= gateway.sidecars.ratelimit.timeout:
        yield (
            ("ratelimit", "redis_timeout"),
            f"must be shorter than sidecars.ratelimit.timeout ({gateway.sidecars.ratelimit.timeout:g}s), "
            "or Envoy gives up before the store-error policy applies",
        )
    for i, api in enumerate(gateway.apis):
        names: set[str] = set()
        for j, limit in enumerate(api.limits):
            if limit.by == "consumer" and api.auth.anonymous:
                yield ("apis", i, "limits", j, "by"), "an anonymous API has no consumer: count by ip or global"
            unrouted = [m for m in limit.methods if api.match.methods and m not in api.match.methods]
            if unrouted:
                yield (
                    ("apis", i, "limits", j, "methods"),
                    f"{', '.join(unrouted)} never reaches this API (match.methods: {', '.join(api.match.methods)})",
                )
            if limit.name is not None and limit.name in names:
                yield ("apis", i, "limits", j, "name"), f"duplicate limit name {limit.name!r}"
            names.add(limit.name or "")
    for plan_name, plan in gateway.plans.items():
        names = set()
        for j, rule in enumerate(plan.limits):
            if rule.name is not None and rule.name in names:
                yield ("plans", plan_name, "limits", j, "name"), f"duplicate limit name {rule.name!r}"
            names.add(rule.name or "")
