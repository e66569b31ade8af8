"""The Redis store for real: the same answers as memory, batching, exact budgets across
processes, each algorithm's boundaries, Redis Cluster, and a Redis that dies or hangs."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from prometheus_client import REGISTRY

from ratelimit import limits
from ratelimit.algorithms import COUNTED, FIXED, GCRA, SLIDING, Check
from ratelimit.limiter import Limiter, Verdict
from ratelimit.limits import Descriptor, Request
from ratelimit.store import MemoryStore, RedisStore
from sidegate import config
from tests.conftest import LOGS, FakeClock, GrpcServerProcess, RedisServer, free_port, wait_until

T0 = 1_700_000_040.0


def gateway_limits(rules: list[dict[str, Any]], plans: dict[str, Any] | None = None, **ratelimit: Any) -> limits.Limits:
    doc = {
        "listeners": [{"name": "http", "port": 8080}],
        "services": {"echo": {"endpoints": ["127.0.0.1:9080"]}},
        "plans": plans or {},
        "ratelimit": ratelimit,
        "apis": [{"name": "orders", "match": {"prefix": "/orders"}, "service": "echo", "limits": rules}],
    }
    return limits.from_gateway(config.parse(yaml.safe_dump(doc)))


def unique() -> str:
    return uuid.uuid4().hex[:12]


def by_ip(ip: str) -> Request:
    return Request("sidegate", (Descriptor((("api", "orders"), ("remote_address", ip), ("method", "GET"))),))


def by_consumer(consumer: str, plan: str = "gold") -> Request:
    return Request(
        "sidegate",
        (
            Descriptor((("api", "orders"), ("consumer", consumer), ("method", "GET"))),
            Descriptor((("plan", plan), ("consumer", consumer), ("method", "GET"))),
        ),
    )


# --- the same answers as the memory store -------------------------------------------------


def test_redis_and_memory_give_identical_outcomes_for_random_traffic(redis_server: RedisServer) -> None:
    async def go() -> list[str]:
        rng = random.Random(5)
        memory, store = MemoryStore(), RedisStore(redis_server.url, timeout=2.0)
        run = unique()
        now = 1_700_000_000_000 + rng.randrange(1_000_000)
        mismatches = []
        try:
            for step in range(1_500):
                now += rng.choice([0, 1, 7, 100, 333, 999, 1_000, 2_500])
                group = []
                for j in range(rng.randint(1, 3)):
                    algorithm = rng.choice([FIXED, SLIDING, GCRA, COUNTED])
                    limit, window = rng.choice([0, 1, 3, 10, 100]), rng.choice([1_000, 1_500, 3_000])
                    key = f"sg:rl:{{x{run}}}:{j}:{algorithm}:{limit}:{window}"
                    cost, shadow, reserve = rng.choice([0, 1, 1, 2, 5]), rng.random() < 0.2, rng.choice([0, 0, 3, 20])
                    group.append(Check(key, algorithm, limit, window, cost, shadow, reserve))
                expected = memory.decide(group, now)
                (answer,) = await store.apply([group], now)
                if answer != expected:
                    mismatches.append(f"{step}: {group} memory={expected} redis={answer}")
        finally:
            await store.close()
        return mismatches

    assert asyncio.run(go()) == []


# --- each algorithm at its boundaries -----------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, redis_server: RedisServer) -> str:
    return str(request.param)


def phases(
    backend: str, redis_server: RedisServer, made: limits.Limits, steps: list[tuple[float, int]]
) -> list[list[bool]]:
    """Run ``count`` requests at each ``time`` on one limiter; the admitted flags per step."""
    clock = FakeClock(T0)
    store = RedisStore(redis_server.url, timeout=2.0) if backend == "redis" else MemoryStore()
    limiter = Limiter(made, store, clock, over_limit_cache=False)
    req = by_ip(unique())

    async def go() -> list[list[bool]]:
        out = []
        try:
            for at, count in steps:
                clock.now = at
                out.append([(await limiter.decide(req)).ok for _ in range(count)])
        finally:
            await store.close()
        return out

    return asyncio.run(go())


def test_fixed_window_boundary(backend: str, redis_server: RedisServer) -> None:
    made = gateway_limits([{"by": "ip", "requests": 5, "window": "1m"}])
    # The last millisecond of a minute, then the first of the next: the whole limit again at once.
    assert phases(backend, redis_server, made, [(T0 + 59.999, 6), (T0 + 60.0, 6)]) == [
        [True] * 5 + [False],
        [True] * 5 + [False],
    ]


def test_sliding_window_boundary(backend: str, redis_server: RedisServer) -> None:
    made = gateway_limits([{"by": "ip", "requests": 10, "window": "1m", "algorithm": "sliding_window"}])
    # A quarter into the next minute 75 % of the previous 10 still count; three quarters in, 25 %.
    assert phases(backend, redis_server, made, [(T0 + 59.0, 11), (T0 + 75.0, 4), (T0 + 105.0, 6)]) == [
        [True] * 10 + [False],
        [True] * 2 + [False] * 2,  # 7.5 + 2 = 9.5
        [True] * 5 + [False],  # 2.5 + 2 + 5 = 9.5
    ]


def test_gcra_boundary(backend: str, redis_server: RedisServer) -> None:
    made = gateway_limits([{"by": "ip", "requests": 10, "window": "1s", "algorithm": "gcra"}])
    # A burst of 10, then one token per 100 ms, to the millisecond.
    assert phases(backend, redis_server, made, [(T0 + 0.123, 11), (T0 + 0.222, 1), (T0 + 0.223, 2)]) == [
        [True] * 10 + [False],
        [False],
        [True, False],
    ]


# --- batching and the script --------------------------------------------------------------


def test_concurrent_decisions_share_pipelines_and_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, timeout=2.0)
    pipelines = []
    original = store._pipeline

    async def counting(client: Any, groups: Any) -> Any:
        pipelines.append(len(groups))
        return await original(client, groups)

    store._pipeline = counting  # type: ignore[method-assign]
    limiter = Limiter(gateway_limits([{"by": "ip", "requests": 50, "window": "1h"}]), store, time.time)

    async def go() -> list[Verdict]:
        try:
            return list(await asyncio.gather(*(limiter.decide(by_ip("burst-" + RUN)) for _ in range(200))))
        finally:
            await store.close()

    verdicts = asyncio.run(go())
    assert sum(v.ok for v in verdicts) == 50
    assert sum(pipelines) == 200 - limiter.stats["over_limit_cache_hits"]
    assert len(pipelines) < 20, pipelines  # 200 requests, a handful of round trips


RUN = unique()


def test_replicas_leasing_units_admit_no_more_than_the_limit_in_few_round_trips(redis_server: RedisServer) -> None:
    made = gateway_limits([{"by": "ip", "requests": 2_000, "window": "1h"}])
    stores = [RedisStore(redis_server.url, timeout=2.0) for _ in range(3)]
    round_trips = []
    for store in stores:
        original = store._pipeline

        async def counting(client: Any, groups: Any, original: Any = original) -> Any:
            round_trips.append(len(groups))
            return await original(client, groups)

        store._pipeline = counting  # type: ignore[method-assign]
    replicas = [Limiter(made, store, time.time, lease=100) for store in stores]
    req = by_ip("leased-" + unique())
    rng = random.Random(3)

    async def go() -> list[bool]:
        try:
            admitted = []
            for _ in range(60):  # waves of concurrent requests, each to any replica
                wave = [rng.choice(replicas).decide(req) for _ in range(40)]
                admitted += [verdict.ok for verdict in await asyncio.gather(*wave)]
            return admitted
        finally:
            for store in stores:
                await store.close()

    admitted = asyncio.run(go())
    held = sum(replica.leases.units() for replica in replicas)
    assert sum(admitted) + held == 2_000  # every unit counted in Redis was used or is still held
    assert sum(admitted) >= 2_000 - 3 * 20  # at most 1 % of the limit per replica unused
    assert sum(round_trips) < 2_400 / 5  # most requests never waited on Redis


def test_a_flushed_script_is_loaded_again(redis_server: RedisServer) -> None:
    async def go() -> list[bool]:
        store = RedisStore(redis_server.url, timeout=2.0)
        limiter = Limiter(gateway_limits([{"by": "ip", "requests": 3, "window": "1h"}]), store, time.time)
        ip = unique()
        try:
            first = (await limiter.decide(by_ip(ip))).ok
            redis.Redis.from_url(redis_server.url).script_flush()
            rest = [(await limiter.decide(by_ip(ip))).ok for _ in range(3)]
        finally:
            await store.close()
        return [first, *rest]

    assert asyncio.run(go()) == [True, True, True, False]


# --- a Redis that dies, or hangs ----------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        server.stop()


async def timed(limiter: Limiter, req: Request, count: int) -> list[tuple[bool, float]]:
    out = []
    for _ in range(count):
        start = time.monotonic()
        verdict = await limiter.decide(req)
        out.append((verdict.ok, time.monotonic() - start))
    return out


NO_STALL = 1.0  # seconds: far above the 50 ms Redis timeout, far below a hang


def degraded_metric() -> float | None:
    return REGISTRY.get_sample_value("sidegate_store_degraded", {"sidecar": "ratelimit", "store": "counters"})


@pytest.mark.parametrize("policy", ["allow", "deny", "local"])
def test_redis_killed_mid_burst_follows_the_policy_and_recovers(own_redis: RedisServer, policy: str) -> None:
    made = gateway_limits(
        [{"by": "ip", "requests": 10, "window": "1h", "algorithm": "gcra"}],
        on_store_error=policy,
        expected_replicas=2,
    )

    async def go() -> tuple[list[tuple[bool, float]], list[tuple[bool, float]], bool]:
        store = RedisStore(own_redis.url, timeout=0.05)
        limiter = Limiter(made, store, time.time, expected_replicas=2)
        try:
            before = await timed(limiter, by_ip("a"), 3)
            assert own_redis.proc is not None
            own_redis.proc.kill()
            own_redis.proc.wait(10)
            during = await timed(limiter, by_ip("b"), 8)
            assert limiter.degraded
            assert degraded_metric() == 1  # the metric follows the breaker, whoever asks
            own_redis.start()  # the same port, empty
            deadline = time.monotonic() + 10
            recovered = False
            while time.monotonic() < deadline and not recovered:
                await limiter.decide(by_ip("c"))
                recovered = not limiter.degraded
                await asyncio.sleep(0.05)
            assert degraded_metric() == (0 if recovered else 1)
            return before, during, recovered
        finally:
            await store.close()

    before, during, recovered = asyncio.run(go())
    assert [ok for ok, _ in before] == [True, True, True]
    expected = {"allow": [True] * 8, "deny": [False] * 8, "local": [True] * 5 + [False] * 3}[policy]
    assert [ok for ok, _ in during] == expected
    assert max(seconds for _, seconds in during) < NO_STALL
    assert recovered


def test_a_hung_redis_costs_no_decision_more_than_the_timeout(own_redis: RedisServer) -> None:
    made = gateway_limits([{"by": "ip", "requests": 100, "window": "1h"}], on_store_error="allow")

    async def go() -> tuple[list[tuple[bool, float]], list[tuple[bool, float]], bool]:
        store = RedisStore(own_redis.url, timeout=0.05)
        limiter = Limiter(made, store, time.time)
        assert own_redis.proc is not None
        try:
            await limiter.decide(by_ip("warm"))  # connected, script loaded
            own_redis.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
            sequential = await timed(limiter, by_ip("x"), 20)
            start = time.monotonic()
            verdicts = await asyncio.gather(*(limiter.decide(by_ip(f"y{i}")) for i in range(50)))
            concurrent = [(v.ok, time.monotonic() - start) for v in verdicts]
            own_redis.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and limiter.degraded:
                await limiter.decide(by_ip("z"))
                await asyncio.sleep(0.05)
            return sequential, concurrent, not limiter.degraded
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
            await store.close()

    sequential, concurrent, recovered = asyncio.run(go())
    assert all(ok for ok, _ in sequential + concurrent)  # on_store_error: allow
    assert max(seconds for _, seconds in sequential + concurrent) < 0.5
    assert recovered


def test_a_pause_of_the_event_loop_does_not_open_the_breaker(own_redis: RedisServer) -> None:
    """Scheduling noise: the loop stalls (a busy host) while batches are in flight, so they miss
    the 50 ms timeout although Redis answered. One stall is one failure, not an outage."""
    made = gateway_limits([{"by": "ip", "requests": 1_000, "window": "1h"}], on_store_error="deny")

    async def go() -> tuple[list[bool], bool, bool]:
        store = RedisStore(own_redis.url, timeout=0.05)
        limiter = Limiter(made, store, time.time)
        try:
            await limiter.decide(by_ip("warm"))
            stalls = []
            for round_ in range(3):
                pending = [asyncio.ensure_future(limiter.decide(by_ip(f"s{round_}-{i}"))) for i in range(4)]
                for _ in range(20):
                    await asyncio.sleep(0)  # the batch goes out
                time.sleep(0.15)  # the loop stalls: every batch in flight times out
                stalls += [v.ok for v in await asyncio.gather(*pending)]
                after = await limiter.decide(by_ip(f"after{round_}"))  # Redis answers: count reset
                assert after.ok, after.body
            return stalls, limiter.degraded, store.errors > 0
        finally:
            await store.close()

    stalls, degraded, timed_out = asyncio.run(go())
    assert timed_out  # the stalls did make batches miss their timeout
    assert False in stalls  # refused by on_store_error: deny, as the store did not answer in time
    assert not degraded


def test_the_breaker_closes_within_a_second_of_redis_answering_again(own_redis: RedisServer) -> None:
    """Redis down long enough for the probes to back off to their cap, then back on the same
    port just after a probe failed: the next probe finds it within the cap."""
    made = gateway_limits([{"by": "ip", "requests": 1_000, "window": "1h"}], on_store_error="deny")

    async def go() -> float:
        store = RedisStore(own_redis.url, timeout=0.05)
        limiter = Limiter(made, store, time.time)
        breaker = store.breaker
        assert own_redis.proc is not None
        try:
            assert (await limiter.decide(by_ip("warm"))).ok
            own_redis.proc.kill()
            own_redis.proc.wait(10)
            deadline = time.monotonic() + 6
            # Traffic every 20 ms until a probe has just failed at the longest cooldown.
            while time.monotonic() < deadline:
                await limiter.decide(by_ip("down"))
                just_failed = breaker.retry_at - breaker.clock() > breaker.cap - 0.05
                if breaker.state == breaker.OPEN and breaker.cooldown >= breaker.cap and just_failed:
                    break
                await asyncio.sleep(0.02)
            assert limiter.degraded
            await asyncio.to_thread(own_redis.start)  # returns once it answers PING
            back = time.monotonic()
            while limiter.degraded and time.monotonic() - back < 10:
                await limiter.decide(by_ip("up"))
                await asyncio.sleep(0.02)
            return time.monotonic() - back
        finally:
            await store.close()

    assert asyncio.run(go()) < 1.0


def test_a_redis_missing_at_start_is_reported_and_joined_when_it_comes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # its port is free until started
    made = gateway_limits([{"by": "ip", "requests": 1, "window": "1h"}], on_store_error="allow")

    async def go() -> tuple[bool, bool, list[bool]]:
        store = RedisStore(server.url, timeout=0.05)
        limiter = Limiter(made, store, time.time)
        try:
            warmed = await store.warm(within=0.5)
            degraded = limiter.degraded
            server.start()
            deadline = time.monotonic() + 10
            while limiter.degraded and time.monotonic() < deadline:
                await limiter.decide(by_ip("probe"))
                await asyncio.sleep(0.05)
            return warmed, degraded, [(await limiter.decide(by_ip("after"))).ok for _ in range(2)]
        finally:
            await store.close()
            server.stop()

    warmed, degraded_at_start, after = asyncio.run(go())
    assert (warmed, degraded_at_start) == (False, True)
    assert after == [True, False]  # counted in Redis again: limit 1


# --- two server processes, one budget -----------------------------------------------------

GATEWAY = """\
listeners: [{{name: http, port: 8080}}]
sidecars:
  ratelimit: {{address: "127.0.0.1:{port}", timeout: 1s}}
services: {{echo: {{endpoints: ["127.0.0.1:9080"]}}}}
ratelimit: {{redis_timeout: 500ms}}
plans:
  gold: {{limits: [{{requests: {limit}, window: 1h, algorithm: gcra}}]}}
apis:
  - name: orders
    match: {{prefix: /orders}}
    service: echo
"""


class ServeProcess(GrpcServerProcess):
    """``sidegate serve --sidecars ratelimit`` on a free port, logging to a file."""

    def __init__(self, workdir: Path, config_path: Path, redis_url: str, workers: int = 1) -> None:
        port = free_port()
        argv = [
            *(sys.executable, "-m", "sidegate", "serve", "--sidecars", "ratelimit", "--config", str(config_path)),
            *("--port", str(port), "--workers", str(workers), "--redis", redis_url),
            *("--state-dir", str(workdir / "state"), "--grace", "1"),
        ]
        super().__init__(argv, port, workdir / f"ratelimit-{port}.log", "envoy.service.ratelimit.v3.RateLimitService")


async def should_rate_limit(port: int, consumer: str, count: int) -> list[int]:
    entry = ratelimit_pb2.RateLimitDescriptor.Entry
    message = rls_pb2.RateLimitRequest(
        domain="sidegate",
        descriptors=[
            ratelimit_pb2.RateLimitDescriptor(
                entries=[entry(key="plan", value="gold"), entry(key="consumer", value=consumer)]
            )
        ],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        replies = await asyncio.gather(*(stub.ShouldRateLimit(message, timeout=10) for _ in range(count)))
    return [reply.overall_code for reply in replies]


def test_two_server_processes_sharing_one_redis_admit_exactly_n_of_m(redis_server: RedisServer, tmp_path: Path) -> None:
    limit, per_server = 120, 150
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(GATEWAY.format(port=9001, limit=limit))
    servers = [ServeProcess(tmp_path, config_path, redis_server.url) for _ in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        consumer = "shared-" + unique()

        async def both() -> list[list[int]]:
            return list(await asyncio.gather(*(should_rate_limit(s.port, consumer, per_server) for s in servers)))

        codes = asyncio.run(both())
    finally:
        for server in servers:
            server.stop()
    ok = rls_pb2.RateLimitResponse.OK
    admitted = [sum(code == ok for code in per) for per in codes]
    assert sum(admitted) == limit, admitted
    assert all(len(per) == per_server for per in codes)


def test_sighup_reloads_every_worker_and_a_bad_file_keeps_the_old_limits(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(GATEWAY.format(port=9001, limit=2))
    server = ServeProcess(tmp_path, config_path, redis_server.url, workers=2)
    ok = rls_pb2.RateLimitResponse.OK

    def rewrite(text: str) -> None:
        """Same size, inode and mtime: only SIGHUP can notice (the file poller cannot)."""
        stat = config_path.stat()
        assert len(text) == stat.st_size
        with config_path.open("r+") as handle:
            handle.write(text)
        os.utime(config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def admitted(count: int) -> int:
        return sum(code == ok for code in asyncio.run(should_rate_limit(server.port, "c-" + unique(), count)))

    try:
        server.wait_ready()
        # Every worker has its handler once the supervisor says "serving" (all workers ready).
        wait_until(lambda: '"msg":"serving"' in server.log.read_text(), timeout=30, what="all workers")
        assert admitted(6) == 2
        rewrite(GATEWAY.format(port=9001, limit=5))
        server.proc.send_signal(signal.SIGHUP)
        # Each of the two workers says so (the file's stamp did not move: only SIGHUP can do this).
        wait_until(lambda: server.log.read_text().count('"msg":"limits reloaded"') >= 2, timeout=10, what="reload")
        assert admitted(8) == 5
        rewrite(GATEWAY.format(port=9001, limit=5).replace("window: 1h", "window: 1x"))
        server.proc.send_signal(signal.SIGHUP)
        error = f"{config_path}:7: plans.gold.limits[0].window: not a duration: '1x'"
        wait_until(lambda: _lines_with(server.log, error) >= 2, timeout=10, what="a refusal from each worker")
        assert admitted(8) == 5
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


def _lines_with(log: Path, text: str) -> int:
    return sum(text in line for line in log.read_text().splitlines())


# --- Redis Cluster ------------------------------------------------------------------------


class RedisCluster:
    """Three redis-server primaries in cluster mode on loopback, joined by redis-cli."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = [free_port() for _ in range(3)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            pytest.fail("redis-server and redis-cli are needed (Debian: apt-get install redis-server)")
        for port in self.ports:
            log = self.workdir / f"cluster-{port}.log"
            argv = [
                *(server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                *("--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf")),
                *("--cluster-port", str(free_port()), "--cluster-node-timeout", "2000", "--logfile", str(log)),
            ]
            self.procs.append(subprocess.Popen(argv, cwd=self.workdir))
            LOGS.append(log)
        for port in self.ports:
            wait_until(lambda port=port: self._cli(port, "ping") == "PONG", what=f"cluster node {port}")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        for port in self.ports:
            wait_until(lambda port=port: "cluster_state:ok" in self._cli(port, "cluster", "info"), what="cluster ok")

    @staticmethod
    def _cli(port: int, *args: str) -> str:
        cli = shutil.which("redis-cli")
        assert cli is not None
        result = subprocess.run([cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    def keys(self, port: int, pattern: str) -> list[str]:
        return [k for k in self._cli(port, "--scan", "--pattern", pattern).splitlines() if k]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    running = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_redis_cluster_keeps_a_consumers_counters_on_one_shard_and_counts_exactly(cluster: RedisCluster) -> None:
    made = gateway_limits(
        [{"by": "consumer", "requests": 4, "window": "1h"}],
        plans={"gold": {"limits": [{"requests": 6, "window": "1h", "algorithm": "sliding_window"}]}},
    )
    consumers = [f"user{i}-{unique()}" for i in range(30)]

    async def go() -> tuple[bool, list[list[bool]]]:
        store = RedisStore(f"redis://127.0.0.1:{cluster.ports[0]}/0", timeout=1.0)
        limiter = Limiter(made, store, time.time)
        try:
            results = await asyncio.gather(
                *(asyncio.gather(*(limiter.decide(by_consumer(c)) for _ in range(6))) for c in consumers)
            )
            return store.cluster, [[v.ok for v in per] for per in results]
        finally:
            await store.close()

    detected, results = asyncio.run(go())
    assert detected
    # The API limit (4 per hour) refuses first; the refused requests were not charged to the plan.
    assert all(sum(per) == 4 for per in results), results
    shards_used = set()
    for consumer in consumers:
        holders = [port for port in cluster.ports if cluster.keys(port, f"sg:rl:{{c:{consumer}}}:*")]
        assert len(holders) == 1, (consumer, holders)  # both counters of a consumer on one shard
        shards_used.add(holders[0])
        (holder,) = holders
        assert len(cluster.keys(holder, f"sg:rl:{{c:{consumer}}}:*")) == 2
    assert len(shards_used) >= 2  # and consumers spread over the cluster
