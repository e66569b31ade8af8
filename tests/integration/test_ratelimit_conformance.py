"""Conformance with Envoy's reference rate-limit service (envoyproxy/ratelimit), on every store.

Each case runs the same requests, as real protos through the servicer's conversions and the
limiter, against the memory store, a real Redis and a three-node Redis Cluster, and pins the
reference's answers. Each docstring names the file of the reference's source (or its README)
that the behaviour was read from; the cases are written from that reading, not copied.

The limits are the folder examples/ratelimit-reference (written fresh from the reference
README's examples) plus a few files below for what the README has no example of. The last
test runs two service processes on that folder against one Redis and counts the admissions.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2

from ratelimit import reference, servicer
from ratelimit.limiter import Limiter, ReferenceOptions
from ratelimit.limits import Limits
from ratelimit.store import MemoryStore, RedisStore, Store
from tests.conftest import ROOT, GrpcServerProcess, RedisServer, free_port, wait_until
from tests.integration.test_ratelimit_redis import RedisCluster

EXAMPLES = ROOT / "examples" / "ratelimit-reference"
T0 = 1_700_006_400.0  # a whole day (and hour, minute, second) on the epoch grid
OK = rls_pb2.RateLimitResponse.OK
OVER = rls_pb2.RateLimitResponse.OVER_LIMIT
MAX_UINT32 = 2**32 - 1
EXTRA = """\
domain: conformance
descriptors:
  - key: named
    rate_limit: {unit: minute, requests_per_unit: 3, name: three_a_minute}
  - key: unnamed
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: two
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: ten
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: route
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: route
    value: /api/admin/*
    rate_limit: {unit: minute, requests_per_unit: 100}
  - key: route
    value: "*/v*/users"
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: route
    value: "/x*y*z"
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: route
    value: "*.json"
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: tenant
    value: "acme-*"
    value_to_metric: true
    metadata: {owner: platform}
    rate_limit: {unit: minute, requests_per_unit: 5}
  - key: soft
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
"""

assert T0 % 86_400 == 0


def domains() -> dict[str, Any]:
    found = reference.load(reference.folder_files(EXAMPLES))
    name, root = reference.parse(EXTRA, "conformance.yaml")
    return {**found, name: root}


# --- the stores ---------------------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    url: str | None = None
    ports: list[int] = field(default_factory=list)

    def store(self) -> Store:
        return MemoryStore() if self.url is None else RedisStore(self.url, timeout=2.0)

    def flush(self) -> None:
        for port in self.ports:
            with redis.Redis(port=port) as client:
                client.flushall()


@pytest.fixture(scope="module", params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    workdir = tmp_path_factory.mktemp(f"conformance-{request.param}")
    if request.param == "memory":
        yield Backend("memory")
    elif request.param == "redis":
        server = RedisServer(workdir)
        server.start()
        try:
            yield Backend("redis", server.url, [server.port])
        finally:
            server.stop()
    else:
        cluster = RedisCluster(workdir)
        try:
            cluster.start()
            yield Backend("cluster", f"redis://127.0.0.1:{cluster.ports[0]}/0", cluster.ports)
        finally:
            cluster.stop()


@pytest.fixture
def fresh(backend: Backend) -> Backend:
    backend.flush()
    return backend


# --- requests and answers -----------------------------------------------------------------


@dataclass(frozen=True)
class D:
    """One descriptor: entries, and optionally its own hits_addend and a limit override."""

    entries: tuple[tuple[str, str], ...]
    hits: int | None = None
    limit: tuple[int, str] | None = None

    def proto(self) -> Any:
        entry = ratelimit_pb2.RateLimitDescriptor.Entry
        message = ratelimit_pb2.RateLimitDescriptor(entries=[entry(key=k, value=v) for k, v in self.entries])
        if self.hits is not None:
            message.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=self.hits))
        if self.limit is not None:
            unit = rls_pb2.RateLimitResponse.RateLimit.Unit.Value(self.limit[1].upper())
            message.limit.CopyFrom(
                ratelimit_pb2.RateLimitDescriptor.RateLimitOverride(requests_per_unit=self.limit[0], unit=unit)
            )
        return message


def d(*entries: tuple[str, str], hits: int | None = None, limit: tuple[int, str] | None = None) -> D:
    return D(tuple(entries), hits, limit)


@dataclass(frozen=True)
class Ask:
    domain: str
    descriptors: tuple[D, ...]
    hits: int = 0
    at: float | None = None  # move the clock here first

    def proto(self) -> Any:
        return rls_pb2.RateLimitRequest(
            domain=self.domain, descriptors=[one.proto() for one in self.descriptors], hits_addend=self.hits
        )


def ask(domain: str, *descriptors: D, hits: int = 0, at: float | None = None) -> Ask:
    return Ask(domain, descriptors, hits, at)


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(
    backend: Backend, asks: Sequence[Ask], *, options: ReferenceOptions | None = None, cache: bool = False
) -> tuple[list[Any], Limiter]:
    """Send ``asks`` one after the other; the responses (protos) and the limiter (its stats)."""

    async def go() -> tuple[list[Any], Limiter]:
        clock = FakeClock()
        store = backend.store()
        limiter = Limiter(Limits(domains=domains()), store, clock, over_limit_cache=cache, reference=options)
        try:
            answers = []
            for one in asks:
                if one.at is not None:
                    clock.now = one.at
                answers.append(servicer.to_response(await limiter.decide(servicer.to_request(one.proto()))))
            return answers, limiter
        finally:
            await store.close()

    return asyncio.run(go())


def codes(answers: Sequence[Any]) -> list[int]:
    return [a.overall_code for a in answers]


# --- the cases ----------------------------------------------------------------------------


def test_current_limit_name_is_the_rules_name_empty_without_one_and_for_overrides(fresh: Backend) -> None:
    """src/config/config_impl.go: a rule's ``name`` travels in the RateLimit it answers with; an
    unnamed rule has an empty name, and a limit override is built with an empty name."""
    answers, _ = run(
        fresh,
        [
            ask("conformance", d(("named", "a"))),
            ask("conformance", d(("unnamed", "a"))),
            ask("conformance", d(("anything", "a"), limit=(7, "hour"))),
        ],
    )
    named, unnamed, override = (a.statuses[0].current_limit for a in answers)
    assert (named.name, named.requests_per_unit, named.unit) == (
        "three_a_minute",
        3,
        rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    )
    assert (unnamed.name, unnamed.requests_per_unit) == ("", 3)
    assert (override.name, override.requests_per_unit, override.unit) == (
        "",
        7,
        rls_pb2.RateLimitResponse.RateLimit.HOUR,
    )


def test_hits_addend_is_always_counted_and_over_answers_remaining_zero(fresh: Backend) -> None:
    """src/redis/fixed_cache_impl.go and src/limiter/base_limiter.go: each key is incremented by
    the whole addend, refused or not; the answer comes from the count after the increment
    (over when it passes the limit, with 0 remaining). src/utils/utilities.go: a descriptor's own
    hits_addend wins, and a request's addend of 0 means 1, so a descriptor addend of 0 only reads."""
    answers, _ = run(
        fresh,
        [
            ask("conformance", d(("ten", "k")), hits=4),  # 4
            ask("conformance", d(("ten", "k")), hits=7),  # 11: over, and counted
            ask("conformance", d(("ten", "k"), hits=0)),  # reads 11: still over
            ask("conformance", d(("two", "k")), hits=2),  # exactly at the limit
            ask("conformance", d(("two", "k"), hits=0)),  # reads 2: OK, nothing left
        ],
    )
    assert codes(answers) == [OK, OVER, OVER, OK, OK]
    assert [a.statuses[0].limit_remaining for a in answers] == [6, 0, 0, 0, 0]


def test_stop_cache_key_increment_when_overlimit_counts_only_the_hit_that_goes_over(fresh: Backend) -> None:
    """src/redis/fixed_cache_impl.go with STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT
    (src/settings/settings.go): counters are read first; when a hit would pass its limit, the
    other descriptors of the request are not counted. Without it, every descriptor counts."""
    steps = [
        ask("conformance", d(("two", "s"))),
        ask("conformance", d(("two", "s"))),  # two is full
        ask("conformance", d(("ten", "s")), d(("two", "s"))),  # two goes over
        ask("conformance", d(("ten", "s"), hits=0)),  # how many did ten count?
    ]
    stopped, _ = run(fresh, steps, options=ReferenceOptions(stop_increment=True))
    assert codes(stopped) == [OK, OK, OVER, OK]
    assert stopped[2].statuses[0].code == OK
    assert stopped[3].statuses[0].limit_remaining == 10  # ten was not counted
    fresh.flush()
    counted, _ = run(fresh, steps)
    assert codes(counted) == [OK, OK, OVER, OK]
    assert counted[3].statuses[0].limit_remaining == 9  # by default it was


def test_duration_until_reset_is_whole_seconds_from_one_to_the_unit(fresh: Backend) -> None:
    """src/utils/utilities.go (CalculateReset): the seconds left in the unit's window, from the
    whole second of now, so between 1 (the window's last second) and the unit itself."""
    answers, _ = run(
        fresh,
        [
            ask("conformance", d(("named", "r")), at=T0),  # a window's first instant
            ask("conformance", d(("named", "r")), at=T0 + 59.5),  # its last second
            ask("conformance", d(("ten", "r")), at=T0 + 0.25),
        ],
    )
    resets = [(a.statuses[0].duration_until_reset.seconds, a.statuses[0].duration_until_reset.nanos) for a in answers]
    assert resets == [(60, 0), (1, 0), (3600, 0)]


def test_wildcards_first_match_in_file_order_and_every_form(fresh: Backend) -> None:
    """src/config/config_impl.go: an exact key_value first, then the wildcard values in the order
    the file lists them (the first that matches wins, not the longest), then the bare key; a
    ``*`` matches any run of characters wherever it stands (README: wildcard values)."""

    def limit_of(value: str) -> int:
        (answer,), _ = run(fresh, [ask("conformance", d(("route", value)))])
        return answer.statuses[0].current_limit.requests_per_unit if answer.statuses[0].HasField("current_limit") else 0

    assert limit_of("/api/orders") == 1
    assert limit_of("/api/admin/users") == 1  # /api/* is listed first
    assert limit_of("/v2/users") == 2  # a leading * and one in the middle
    assert limit_of("/x-1-y-2-z") == 3  # several
    assert limit_of("/x-1-y-2-z-9") == 0  # a pattern matches the whole value
    assert limit_of("data.json") == 4
    assert limit_of("/other") == 0


def test_an_unknown_domain_is_ok_before_any_override(fresh: Backend) -> None:
    """src/config/config_impl.go (GetLimit): no config for the domain → no limit, and the
    descriptor's limit override is never looked at."""
    answers, _ = run(fresh, [ask("nobody", d(("k", "v"), limit=(1, "second"))) for _ in range(3)])
    assert codes(answers) == [OK, OK, OK]
    assert not answers[0].statuses[0].HasField("current_limit")
    assert answers[0].statuses[0].limit_remaining == 0


def test_the_same_descriptor_twice_counts_twice_from_the_running_count(fresh: Backend) -> None:
    """src/redis/fixed_cache_impl.go: one increment per descriptor, in order, in one pipeline;
    each answer reads the count its own increment returned."""
    answers, _ = run(
        fresh,
        [
            ask("conformance", d(("two", "t"))),
            ask("conformance", d(("two", "t")), d(("two", "t"))),
        ],
    )
    assert codes(answers) == [OK, OVER]
    assert [s.code for s in answers[1].statuses] == [OK, OVER]
    assert [s.limit_remaining for s in answers[1].statuses] == [0, 0]


def test_share_threshold_makes_every_matching_value_one_counter(fresh: Backend) -> None:
    """README (wildcard values with share_threshold) and src/config/config_impl.go: the values a
    shared wildcard matches count against one budget; without it each value counts alone."""
    files = [ask("files", d(("path", f"/foo/bar{i}"))) for i in range(12)]
    answers, _ = run(fresh, files)
    assert codes(answers) == [OK] * 10 + [OVER] * 2
    alone = [ask("example9", d(("key1", "value0"))) for _ in range(21)] + [ask("example9", d(("key1", "value1")))]
    singles, _ = run(fresh, alone)
    assert codes(singles) == [OK] * 20 + [OVER, OK]  # value1 has a counter of its own


def test_value_to_metric_and_detailed_metric_name_stats_by_value(fresh: Backend) -> None:
    """src/config/config_impl.go: with value_to_metric a level's stats name carries the request's
    value (here through a wildcard); detailed_metric does so for a bare key (README example 8)."""
    answers, limiter = run(
        fresh,
        [ask("conformance", d(("tenant", "acme-1")), hits=6), ask("example8", d(("key1", "other")), hits=11)],
    )
    assert codes(answers) == [OVER, OVER]
    assert limiter.stats["rule.conformance.tenant_acme-1.over_limit"] == 1
    assert limiter.stats["rule.example8.key1_other.over_limit"] == 1


def test_readme_examples_answer_as_the_reference_readme_says(fresh: Backend) -> None:
    """README examples 2, 3, 4, 5 and 7: nested descriptors, key_value before key, the depth of
    the last entry, unlimited (OK with the largest remaining), replaces."""
    marketing = d(("message_type", "marketing"), ("to_number", "2061111111"))
    answers, _ = run(
        fresh,
        [
            *(ask("messaging", marketing, d(("to_number", "2061111111"))) for _ in range(6)),
            ask("edge_proxy_per_ip", d(("remote_address", "50.0.0.5"))),
            ask("edge_proxy_per_ip", d(("remote_address", "50.0.0.1"))),
            ask("example4", d(("key", "value"))),
            ask("example4", d(("key", "value"), ("subkey", "x"))),
            ask("internal", d(("ldap", "x")), d(("azure", "y"))),
            ask(
                "example7", d(("key_1", "value_1"), ("user", "bkthomps")), d(("key_2", "value_2"), ("user", "bkthomps"))
            ),
        ],
    )
    assert codes(answers[:6]) == [OK] * 5 + [OVER]
    assert [s.code for s in answers[5].statuses] == [OVER, OK]
    assert answers[5].statuses[1].limit_remaining == 94  # the 100 a day counted all six
    assert codes(answers[6:8]) == [OVER, OK]
    assert not answers[8].statuses[0].HasField("current_limit")  # no rule at that depth
    assert answers[9].statuses[0].current_limit.requests_per_unit == 300
    ldap, azure = answers[10].statuses
    assert (ldap.code, ldap.limit_remaining, ldap.HasField("current_limit")) == (OK, MAX_UINT32, False)
    assert azure.current_limit.requests_per_unit == 100
    replaced, replacing = answers[11].statuses
    assert not replaced.HasField("current_limit")
    assert replacing.current_limit.requests_per_unit == 10


def test_shadow_mode_answers_ok_and_global_shadow_mode_the_whole_request(fresh: Backend) -> None:
    """src/limiter/base_limiter.go: a rule in shadow_mode that is over answers OK (nothing
    left); README (Global ShadowMode, SHADOW_MODE): an over-limit request is answered OK overall."""
    soft, _ = run(fresh, [ask("conformance", d(("soft", "s"))) for _ in range(3)])
    assert codes(soft) == [OK, OK, OK]
    assert [a.statuses[0].code for a in soft] == [OK, OK, OK]
    assert soft[2].statuses[0].limit_remaining == 0
    steps = [ask("conformance", d(("two", "g"))) for _ in range(3)]
    fresh.flush()
    shadowed, _ = run(fresh, steps, options=ReferenceOptions(global_shadow=True))
    assert codes(shadowed) == [OK, OK, OK]
    assert shadowed[2].statuses[0].code == OVER


def test_headers_only_when_enabled_under_the_references_names_and_no_body(fresh: Backend) -> None:
    """src/service/ratelimit.go and src/settings/settings.go (LIMIT_RESPONSE_HEADERS_ENABLED,
    LIMIT_*_HEADER): off by default; when on, the limit, remaining and reset of the descriptor
    with the least remaining. The reference never sends a body."""
    plain, _ = run(fresh, [ask("conformance", d(("two", "h")), d(("ten", "h"))) for _ in range(3)])
    assert [list(a.response_headers_to_add) for a in plain] == [[], [], []]
    assert [a.raw_body for a in plain] == [b"", b"", b""]
    fresh.flush()
    options = ReferenceOptions(headers=True, limit_header="X-RateLimit-Limit")
    answers, _ = run(fresh, [ask("conformance", d(("ten", "h")), d(("two", "h")), at=T0 + 1.5)], options=options)
    headers = [(h.key, h.value) for h in answers[0].response_headers_to_add]
    assert headers == [("X-RateLimit-Limit", "2"), ("RateLimit-Remaining", "1"), ("RateLimit-Reset", "3599")]


def test_a_key_known_over_answers_from_the_local_cache(fresh: Backend) -> None:
    """src/limiter/base_limiter.go (local cache, LOCAL_CACHE_SIZE_IN_BYTES): once over, a key
    answers over without the store until its window ends; answers match the uncached ones."""
    steps = [ask("conformance", d(("two", "c"))) for _ in range(4)] + [
        ask("conformance", d(("two", "c")), at=T0 + 3600)
    ]
    cached, limiter = run(fresh, steps, cache=True)
    assert codes(cached) == [OK, OK, OVER, OVER, OK]
    assert limiter.stats["over_limit_cache_hits"] == 1
    assert cached[3].statuses[0].duration_until_reset.seconds == 3600


# --- two service processes, one Redis -----------------------------------------------------


class RatelimitProcess(GrpcServerProcess):
    """``python -m ratelimit`` (the reference's environment) on a free port."""

    def __init__(self, workdir: Path, environ: dict[str, str], *argv: str) -> None:
        port = free_port()
        env = dict(os.environ, **environ, GRPC_PORT=str(port))
        command = [sys.executable, "-m", "ratelimit", *argv, "--state-dir", str(workdir / "state")]
        log = workdir / f"ratelimit-{port}.log"
        super().__init__(command, port, log, servicer.RateLimitSidecar.service, env)


async def send(port: int, message: Any, count: int) -> list[int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        replies = await asyncio.gather(*(stub.ShouldRateLimit(message, timeout=10) for _ in range(count)))
    return [reply.overall_code for reply in replies]


def test_two_service_processes_on_the_example_folder_admit_exactly_n_of_m(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Exactness across processes: 2 x 80 concurrent requests against 100 a day to one number
    (README example 2), counted in one Redis given as the reference takes it (host:port)."""
    address = redis_server.url.removeprefix("redis://").removesuffix("/0")
    environ = {"REDIS_URL": address, "REDIS_SOCKET_TYPE": "tcp", "REDIS_TYPE": "single"}
    servers = [RatelimitProcess(tmp_path, environ, "--reference-config", str(EXAMPLES)) for _ in range(2)]
    message = ask("messaging", d(("to_number", f"n-of-m-{os.getpid()}"))).proto()
    try:
        for server in servers:
            server.wait_ready()

        async def both() -> list[list[int]]:
            return list(await asyncio.gather(*(send(s.port, message, 80) for s in servers)))

        per_server = asyncio.run(both())
    finally:
        for server in servers:
            server.stop()
    admitted = sum(code == OK for codes_ in per_server for code in codes_)
    assert admitted == 100, per_server
    assert sum(len(codes_) for codes_ in per_server) == 160


def test_a_symlink_swap_of_runtime_root_reloads_and_a_bad_config_keeps_the_old(tmp_path: Path) -> None:
    """README (File Based Configuration Loading): files under RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
    RUNTIME_APPDIRECTORY; pointing the RUNTIME_ROOT symlink at another directory publishes a new
    config. A config that does not load leaves the one in force."""
    limits = {"v1": "requests_per_unit: 1", "v2": "requests_per_unit: 3", "v3": "requests_per_unit: -1"}
    for version, text in limits.items():
        folder = tmp_path / version / "rl" / "config"
        folder.mkdir(parents=True)
        (folder / "d.yaml").write_text(f"domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: hour, {text}}}\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v1")

    def publish(version: str) -> None:
        swap = tmp_path / "swap"
        swap.symlink_to(tmp_path / version)
        os.replace(swap, current)

    environ = {"RUNTIME_ROOT": str(current), "RUNTIME_SUBDIRECTORY": "rl"}
    server = RatelimitProcess(tmp_path, environ)
    message = ask("d", d(("k", "v"), hits=0)).proto()

    def limit() -> int:
        reply = asyncio.run(send_one(server.port, message))
        return int(reply.statuses[0].current_limit.requests_per_unit)

    try:
        server.wait_ready()
        assert limit() == 1
        publish("v2")
        wait_until(lambda: limit() == 3, timeout=10, what="the new config")
        publish("v3")
        wait_until(lambda: "config not reloaded" in server.log.read_text(), timeout=10, what="the refusal")
        assert limit() == 3
    finally:
        server.stop()
    assert "requests_per_unit: must be a whole number" in server.log.read_text()


async def send_one(port: int, message: Any) -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(message, timeout=10)
