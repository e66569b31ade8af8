"""The names the Envoy compiler and the sidecars share, defined once.

The compiler writes these names into Envoy's config, and Envoy sends them back to the sidecars:
headers that authz sets, the metadata that names an ext_proc route, the rate-limit domain and
the keys of its descriptors. Both sides import this module. A sidecar never imports the
compiler, and this module imports nothing of either side, so the two can change apart as long
as they agree here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model's types only: sidegate.config imports this module
    from sidegate.config import Api, Gateway

# The sidecars, and the gRPC service each one serves (also its health-check service name).
AUTHZ, RATELIMIT, EXTPROC = "authz", "ratelimit", "extproc"
SIDECARS = (AUTHZ, RATELIMIT, EXTPROC)
SIDECAR_GRPC_SERVICE = {
    AUTHZ: "envoy.service.auth.v3.Authorization",
    RATELIMIT: "envoy.service.ratelimit.v3.RateLimitService",
    EXTPROC: "envoy.service.ext_proc.v3.ExternalProcessor",
}


# A sidecar server on Unix sockets: worker n of the server whose socket path is ``base``
# listens on ``<base stem>-<n><suffix>`` (``/run/sidegate/sidecars.sock`` → ``sidecars-0.sock``,
# ``sidecars-1.sock``, …). The kernel binds these paths and the compiler lists each one as an
# endpoint of the sidecar's cluster, so Envoy health-checks and balances every worker.
SOCKET_PATH_MAX = 107  # bytes a Unix socket's path can hold on Linux (sun_path, less its NUL)


def worker_socket(base: str, worker: int) -> str:
    """The socket path of worker ``worker`` of the server at ``base``."""
    head, dot, suffix = base.rpartition(".")
    if not dot or "/" in suffix:
        return f"{base}-{worker}"
    return f"{head}-{worker}.{suffix}"


# Identity headers. Only authz sets them, and Envoy strips them from every client request first.
CONSUMER_HEADER = "x-consumer-id"
PLAN_HEADER = "x-consumer-plan"
METHOD_HEADER = "x-auth-method"
SCOPES_HEADER = "x-auth-scopes"
KEY_ID_HEADER = "x-auth-key-id"
# The consumer's pinned API version: authz sets it from the key or token, and the compiler's
# version routes match on it. authz answers with route-cache clearing, so Envoy re-matches.
PIN_HEADER = "x-sidegate-version"
AUTHZ_HEADERS = (CONSUMER_HEADER, PLAN_HEADER, METHOD_HEADER, SCOPES_HEADER, KEY_ID_HEADER)
IDENTITY_HEADERS = (*AUTHZ_HEADERS, PIN_HEADER)

# Identity headers the gateway did not say: names that services written before the gateway may
# trust. Envoy removes them (and every header of the families below) from each client request
# before any filter reads it, on every route; gateway.yaml's ``identity_headers`` extends or
# narrows the list. What the gateway sets itself (AUTHZ_HEADERS, claim headers) is set after.
STRIPPED_HEADERS = (
    "x-user",
    "x-client-id",
    "x-scopes",
    "x-authenticated-user",
    "x-authenticated-userid",
    "x-authenticated-groups",
    "x-authenticated-scope",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-jwt-payload",
    "x-jwt-claims",
    "x-principal",
    "x-remote-user",
    "remote-user",
    "x-api-key-id",
    "x-userinfo",
    "x-id-token",
    "x-email",
    "x-groups",
    "x-roles",
)
# Families, written with a trailing ``*``: every header whose name starts with the rest.
STRIPPED_FAMILIES = ("x-auth-*", "x-user-*", "x-consumer-*")
# Claim headers an issuer may set that read like a proxy's (oauth2-proxy's names). Every other
# ``x-forwarded-*`` header belongs to Envoy and the proxies before it.
FORWARDED_CLAIM_HEADERS = (
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
)

# ext_proc: the stream's initial metadata names the route, so extproc knows which transform or
# translation a stream needs without looking at the request.
ROUTE_METADATA = "x-sidegate-route"


def route_key(api: str, version: str | None = None) -> str:
    """The name of an ext_proc route: the API, and the version the client asked for if any."""
    return api if version is None else f"{api}:{version}"


# Rate limits. Envoy's route actions (or authz, when it limits in-process) build descriptors of
# these keys in the domain RATELIMIT_DOMAIN, and the ratelimit sidecar counts them.
RATELIMIT_DOMAIN = "sidegate"
RL_API, RL_PLAN, RL_CONSUMER, RL_IP, RL_METHOD = "api", "plan", "consumer", "remote_address", "method"
# What a metadata action sends when authz set none. Without a default Envoy drops the whole
# descriptor, and with no descriptor left it skips the call: a silent bypass.
RL_DEFAULT_CONSUMER, RL_NO_PLAN = "unknown", "none"
# Where the ratelimit actions read authz's dynamic metadata (consumer and plan).
AUTHZ_METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
# A call between mesh services, as a callee's sidecar counts it: ``(mesh_service, CALLEE),
# (mesh_caller, spiffe://…/CALLER), (method, M)``. The caller is the URI SAN of its certificate.
RL_MESH_SERVICE, RL_MESH_CALLER = "mesh_service", "mesh_caller"


def mesh_api(service: str) -> str:
    """The name authz knows a mesh service's ``authz`` by. The colon keeps it apart from every
    API of ``apis:`` (their names cannot hold one)."""
    return f"mesh:{service}"


def rate_limit_shapes(api: Api, gateway: Gateway) -> list[tuple[str, ...]]:
    """The descriptors a request to ``api`` is counted by, as their keys in order; [] for none.

    Each is ``(api, NAME)`` followed by ``(consumer, C)``, ``(remote_address, IP)`` or nothing
    (a global limit). Routes with credentials also get ``(plan, P), (consumer, C)`` when plans
    exist. Every descriptor ends with ``(method, M)``, so method-scoped limits need no other
    descriptor. Envoy's actions and authz's in-process limiting both build from this one list,
    so the two paths count alike.
    """
    wanted = [by for by in ("consumer", "ip", "global") if any(limit.by == by for limit in api.limits)]
    middle = {"consumer": (RL_CONSUMER,), "ip": (RL_IP,), "global": ()}
    shapes = [(RL_API, *middle[by], RL_METHOD) for by in wanted]
    if gateway.plans and not api.auth.anonymous:
        shapes.append((RL_PLAN, RL_CONSUMER, RL_METHOD))
    return shapes


# The pod label ``sidegate mesh inject`` puts on a service whose sidecar Envoy calls authz or
# ratelimit (``mesh.authz``, ``mesh.limits``); deploy/tcp's NetworkPolicy admits pods with it to
# the sidecars' gRPC port, beside Envoy's.
SIDECAR_CALLER_LABEL = "sidegate.io/calls-sidecars"
