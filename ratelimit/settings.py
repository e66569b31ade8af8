"""The environment variables of Envoy's reference rate-limit service, read with their meanings.

A team moving from envoyproxy/ratelimit keeps its environment. ``reference_env`` reads it once,
at start, into a ``ReferenceEnv``: where the config folder is (``RUNTIME_ROOT`` /
``RUNTIME_SUBDIRECTORY`` / ``RUNTIME_APPDIRECTORY``), where Redis is (``REDIS_URL`` as
``host:port``, a socket path, or a list of Cluster nodes; ``REDIS_SOCKET_TYPE``, ``REDIS_TYPE``,
``REDIS_AUTH``, ``REDIS_TLS``), where to listen (``GRPC_HOST``, ``GRPC_PORT``), and the settings
that change answers (``ReferenceOptions``): the response headers, the stop-counting switch
(``STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT``) and ``SHADOW_MODE``. ``LOCAL_CACHE_SIZE_IN_BYTES``
above 0 turns the over-limit cache on.

A variable whose meaning we do not provide (statsd, memcache, xDS config, a second Redis for
per-second limits, ...) is refused by name when it is set to anything but its default, with one
line that says what to do instead: a ``SettingsError``, never a traceback and never ignored.
Variables that only tune the reference's own machinery (pool sizes, pipelining windows, key
expiry jitter) are accepted and have nothing to tune here. The README's migration section lists
them all.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ratelimit.limiter import ReferenceOptions
from sidegate.config import Gateway
from sidegate.errors import SettingsError

DEFAULT_RUNTIME_ROOT = "/srv/runtime_data/current"
DEFAULT_PORT = 8081  # the reference's gRPC port, so Envoy's cluster needs no change
TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE = frozenset({"0", "f", "false", "n", "no", "off"})

# Accepted: they tune the reference's own client and caches; our store pipelines by itself.
TUNING = frozenset(
    {
        "REDIS_POOL_SIZE",
        "REDIS_PIPELINE_WINDOW",
        "REDIS_PIPELINE_LIMIT",
        "REDIS_POOL_ON_EMPTY_BEHAVIOR",
        "REDIS_POOL_ON_EMPTY_WAIT_DURATION",
        "REDIS_HEALTH_CHECK_ACTIVE_CONNECTION",
        "EXPIRATION_JITTER_MAX_SECONDS",
        "NEAR_LIMIT_RATIO",
        "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
        "FORCE_START_WITHOUT_INITIAL_CONFIG",
        "GRPC_MAX_CONNECTION_AGE",
        "GRPC_MAX_CONNECTION_AGE_GRACE",
        "RUNTIME_WATCH_ROOT",  # both ways of publishing a config are noticed (folder_files)
    }
)

# Refused when set to anything but the value given here: name → (accepted value, what to do instead).
REFUSED: dict[str, tuple[str, str]] = {
    "USE_STATSD": ("false", "metrics are Prometheus only (--metrics-port)"),
    "USE_DOG_STATSD": ("false", "metrics are Prometheus only (--metrics-port)"),
    "USE_PROMETHEUS": ("false", "use --metrics-port for the Prometheus endpoint"),
    "LOG_FORMAT": ("json", "logs are JSON lines only"),
    "BACKEND_TYPE": ("redis", "only Redis (or memory, without REDIS_URL) counts limits"),
    "CONFIG_TYPE": ("FILE", "only file configs are supported (no xDS config server)"),
    "MERGE_DOMAIN_CONFIG": ("false", "each domain must live in one file"),
    "CACHE_KEY_PREFIX": ("", "counters use sidegate's own key layout (sg:rl:), one per domain"),
    "REDIS_PERSECOND": ("false", "one Redis (or Cluster) holds every counter"),
    "REDIS_PERSECOND_URL": ("", "one Redis (or Cluster) holds every counter"),
    "REDIS_TLS_CLIENT_CERT": ("", "Redis client certificates are not available: use REDIS_TLS alone"),
    "REDIS_TLS_CLIENT_KEY": ("", "Redis client certificates are not available: use REDIS_TLS alone"),
    "REDIS_TLS_CACERT": ("", "a custom Redis CA is not available: use REDIS_TLS alone"),
    "REDIS_SENTINEL_AUTH": ("", "use one Redis or a Redis Cluster (no Sentinel)"),
    "MEMCACHE_HOST_PORT": ("", "counters live in Redis or in memory (no memcache)"),
    "MEMCACHE_SRV": ("", "counters live in Redis or in memory (no memcache)"),
    "TRACING_ENABLED": ("false", "use --otlp host:port for traces"),
    "GRPC_SERVER_USE_TLS": ("false", "the service speaks cleartext gRPC to a local Envoy"),
    "PORT": ("8080", "the HTTP /json and /healthcheck endpoints are not served: use gRPC health"),
    "DEBUG_PORT": ("6070", "the debug port is not served"),
    "GLOBAL_SHADOW_MODE": ("false", "the reference's name for it is SHADOW_MODE"),
    "RESPONSE_DYNAMIC_METADATA": ("false", "responses carry no dynamic metadata"),
}
LOG_LEVELS = {"debug": "debug", "info": "info", "warn": "warning", "warning": "warning", "error": "error"}
REDIS_TYPES = frozenset({"single", "cluster"})


@dataclass(frozen=True)
class ReferenceEnv:
    """What the reference's environment asks for (None: not set, keep sidegate's default)."""

    folder: Path = Path(DEFAULT_RUNTIME_ROOT) / "config"
    ignore_dotfiles: bool = False
    redis_url: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    log_level: str | None = None
    over_limit_cache: bool = False
    options: ReferenceOptions = field(default_factory=ReferenceOptions)


def _flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise SettingsError(f"{name}={environ[name]!r}: not true or false")


def _int(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: not a whole number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={raw!r}: must be from {low} to {high}")
    return value


def refused(environ: Mapping[str, str]) -> str | None:
    """The first variable set to something we do not provide, as one line; None when all is well."""
    for name in sorted(REFUSED):
        default, instead = REFUSED[name]
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        value = raw.strip()
        same = value.lower() == default.lower()
        if default.lower() in TRUE | FALSE and value.lower() in TRUE | FALSE:
            same = (value.lower() in TRUE) == (default.lower() in TRUE)
        if not same:
            return f"{name}={raw!r} is not supported here: {instead}"
    return None


def options(environ: Mapping[str, str]) -> ReferenceOptions:
    """The reference's settings that change answers; defaults as in the reference."""
    base = ReferenceOptions()
    return ReferenceOptions(
        headers=_flag(environ, "LIMIT_RESPONSE_HEADERS_ENABLED"),
        limit_header=environ.get("LIMIT_LIMIT_HEADER") or base.limit_header,
        remaining_header=environ.get("LIMIT_REMAINING_HEADER") or base.remaining_header,
        reset_header=environ.get("LIMIT_RESET_HEADER") or base.reset_header,
        stop_increment=_flag(environ, "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT"),
        global_shadow=_flag(environ, "SHADOW_MODE"),
    )


def redis_url(environ: Mapping[str, str]) -> str | None:
    """``REDIS_URL`` as the reference reads it (``host:port``, a socket path, or Cluster nodes
    ``h1:p1,h2:p2``) → a URL for redis-py; a ``redis://`` URL passes through. None: not set."""
    raw = environ.get("REDIS_URL", "").strip()
    if not raw:
        return None
    kind = (environ.get("REDIS_TYPE") or "single").strip().lower()
    if kind not in REDIS_TYPES:
        raise SettingsError(f"REDIS_TYPE={kind!r} is not supported here: use single or cluster (no sentinel)")
    if "://" in raw:
        return raw
    socket_type = (environ.get("REDIS_SOCKET_TYPE") or "tcp").strip().lower()
    auth = environ.get("REDIS_AUTH", "")
    user, _, password = auth.rpartition(":") if ":" in auth else ("", "", auth)
    credentials = ""
    if password:
        credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@"
    if socket_type == "unix":
        return f"unix://{credentials}{raw}"
    if socket_type != "tcp":
        raise SettingsError(f"REDIS_SOCKET_TYPE={socket_type!r}: use tcp or unix")
    first = raw.split(",")[0].strip()  # a Cluster is found from any one node
    host, sep, port = first.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SettingsError(f"REDIS_URL={raw!r}: not host:port")
    scheme = "rediss" if _flag(environ, "REDIS_TLS") else "redis"
    return f"{scheme}://{credentials}{host}:{port}"


def reference_env(environ: Mapping[str, str]) -> ReferenceEnv:
    """Read the reference's environment; ``SettingsError`` (one line) for what we refuse."""
    problem = refused(environ)
    if problem is not None:
        raise SettingsError(problem)
    root = environ.get("RUNTIME_ROOT") or DEFAULT_RUNTIME_ROOT
    subdirectory = environ.get("RUNTIME_SUBDIRECTORY") or ""
    folder = Path(root) / subdirectory / (environ.get("RUNTIME_APPDIRECTORY") or "config")
    level = (environ.get("LOG_LEVEL") or "").strip().lower()
    if level and level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL={level!r}: use debug, info, warn or error")
    return ReferenceEnv(
        folder=folder,
        ignore_dotfiles=_flag(environ, "RUNTIME_IGNOREDOTFILES"),
        redis_url=redis_url(environ),
        host=(environ.get("GRPC_HOST") or "").strip() or None,
        port=_int(environ, "GRPC_PORT", DEFAULT_PORT, 1, 65535),
        log_level=LOG_LEVELS.get(level) if level else None,
        over_limit_cache=_int(environ, "LOCAL_CACHE_SIZE_IN_BYTES", 0, 0, 2**40) > 0,
        options=options(environ),
    )


def memory_workers_problem(workers: int, redis: str | None) -> str | None:
    """Counters in memory are one set per process: more than one worker would split every limit
    across them. The one line that says so, or None."""
    if redis or workers <= 1:
        return None
    return (
        f"--workers {workers} with rate-limit counters in memory would give each worker its own "
        "counters (a limit would admit up to workers x its requests): use --workers 1, or give "
        "a Redis (--redis URL or REDIS_URL)"
    )


def counts_in_memory(gateway: Gateway, sidecars: Collection[str]) -> bool:
    """Do ``sidecars`` count rate limits of ``gateway`` (the ratelimit service, or authz deciding
    limits in-process)? Without limits to count, workers have nothing to split."""
    counting = "ratelimit" in sidecars or ("authz" in sidecars and gateway.ratelimit.in_authz)
    has_limits = (
        any(api.limits for api in gateway.apis)
        or any(plan.limits for plan in gateway.plans.values())
        or bool(gateway.ratelimit.reference_configs)
    )
    return counting and has_limits
