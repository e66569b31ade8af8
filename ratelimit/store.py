"""Where counters live: Redis (single node or Cluster) shared by every replica, or memory.

Both backends take *groups* of ``Check``s (the limits one request must pass in one partition)
and answer one ``Outcome`` per check, with the same semantics (``algorithms.evaluate_group``):

* ``RedisStore`` — one group is one ``EVALSHA`` of ``LUA``: atomic, one round trip, every key of
  the group carrying the same ``{hash tag}`` so it runs on one Cluster shard. Groups of requests
  that arrive together are sent as one pipeline (``max_in_flight`` pipelines at a time, the rest
  queue for the next), over redis-py with the hiredis parser; on a Cluster, one pipeline per
  primary, all sent at once. A batch that takes longer than
  ``timeout`` fails as a whole; after a few such failures in a row a ``CircuitBreaker`` answers
  ``StoreUnavailable`` at once until a probe (a reconnect in the background, never a request)
  succeeds, so a dead Redis costs a request at most the timeout and the service reconnects by
  itself. The URL is a plain ``redis://`` one; Cluster mode is detected.
* ``MemoryStore`` — a dict, for one process (the embedded default, and the ``local`` fallback).

Redis exceptions become ``StoreUnavailable`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratelimit import algorithms
from ratelimit.algorithms import CODE, Check, Outcome
from ratelimit.errors import StoreUnavailable
from sidegate import logs, telemetry

log = logging.getLogger("ratelimit.store")
Group = Sequence[Check]
Answer = list[Outcome] | StoreUnavailable


class Store(Protocol):
    async def apply(self, groups: Sequence[Group], now_ms: int) -> list[Answer]:
        """One answer per group: its outcomes, or ``StoreUnavailable`` for that group."""
        ...

    async def close(self) -> None: ...

    @property
    def degraded(self) -> bool: ...


# --- memory -------------------------------------------------------------------------------


class MemoryStore:
    """Counters in a dict for one process, with the semantics of the Lua script.

    Expired state is swept every ``SWEEP_EVERY`` writes; past ``max_keys`` live keys the oldest
    are dropped (those counters restart: a flood of distinct keys cannot exhaust memory).
    """

    SWEEP_EVERY = 10_000

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self.max_keys = max_keys
        self._data: dict[str, tuple[float, int]] = {}  # key → (value, expires at ms)
        self._writes = 0

    @property
    def degraded(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._data)

    def _read(self, key: str, now_ms: int) -> float | None:
        entry = self._data.get(key)
        if entry is None or entry[1] <= now_ms:
            return None
        return entry[0]

    def decide(self, checks: Group, now_ms: int) -> list[Outcome]:
        if any(check.algorithm == algorithms.COUNTED for check in checks):
            return self._decide_counted(checks, now_ms)
        return self._decide_group(checks, now_ms)

    def _decide_group(self, checks: Group, now_ms: int) -> list[Outcome]:
        keys = [algorithms.state_keys(check, now_ms) for check in checks]
        read = [tuple(self._read(key, now_ms) for key in group_keys) for group_keys in keys]
        outcomes, writes = algorithms.evaluate_group(checks, read, now_ms)
        for check, group_keys, value in zip(checks, keys, writes, strict=True):
            if value is not None:
                self._data[group_keys[0]] = (value, algorithms.expiry_ms(check, now_ms, value))
                self._writes += 1
        if self._writes >= self.SWEEP_EVERY:
            self.sweep(now_ms)
        return outcomes

    def _decide_counted(self, checks: Group, now_ms: int) -> list[Outcome]:
        """Counted checks one after the other (a key twice in a group counts twice); the other
        checks of the group, if any, decided together as the Lua script decides them."""
        outcomes: list[Outcome | None] = [None] * len(checks)
        others = [i for i, check in enumerate(checks) if check.algorithm != algorithms.COUNTED]
        if others:
            for i, outcome in zip(others, self._decide_group([checks[i] for i in others], now_ms), strict=True):
                outcomes[i] = outcome
        for i, check in enumerate(checks):
            if check.algorithm != algorithms.COUNTED:
                continue
            (key,) = algorithms.state_keys(check, now_ms)
            outcomes[i], after = algorithms.counted_outcome(self._read(key, now_ms) or 0, check, now_ms)
            if check.cost:
                self._data[key] = (after, algorithms.expiry_ms(check, now_ms, after))
                self._writes += 1
        if self._writes >= self.SWEEP_EVERY:
            self.sweep(now_ms)
        return [outcome for outcome in outcomes if outcome is not None]

    def sweep(self, now_ms: int) -> None:
        self._writes = 0
        self._data = {k: v for k, v in self._data.items() if v[1] > now_ms}
        excess = len(self._data) - self.max_keys
        if excess > 0:
            for key in list(self._data)[: excess + self.max_keys // 10]:
                del self._data[key]

    async def apply(self, groups: Sequence[Group], now_ms: int) -> list[Answer]:
        return [self.decide(group, now_ms) for group in groups]

    async def close(self) -> None:
        self._data.clear()


# --- the Lua script -----------------------------------------------------------------------

# KEYS: per check its state keys (algorithms.state_keys): fixed 1, sliding 2 (current,
# previous), gcra 1, counted 1. Counted checks count one after the other, whatever the others
# say. ARGV: now_ms, n, then per check: algorithm code, limit, window_ms, cost, shadow (0/1),
# reserve. Returns per check: ok (0/1), remaining, reset_ms, retry_ms, leased.
# Mirrors ratelimit/algorithms.py step by step; change both together.
LUA = """
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local EPS = 0.001
local ROUNDING = 1e-6
local KEEP = 1000
local SHARE = 8
local function lease(reserve, room)
  if reserve <= 0 or room < SHARE then return 0 end
  return math.min(reserve, math.floor(room / SHARE))
end
local function least(fits, guess, floor)
  local x = math.max(floor, guess)
  for _ = 1, 3 do
    if fits(x) then break end
    x = x + 1
  end
  for _ = 1, 3 do
    if x > floor and fits(x - 1) then x = x - 1 end
  end
  return x
end
local algo, lim, win, cost, shadow, reserve, key, v1, v2, fits = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
local a, k = 3, 1
local admitted = true
for i = 1, n do
  algo[i] = tonumber(ARGV[a]); lim[i] = tonumber(ARGV[a + 1]); win[i] = tonumber(ARGV[a + 2])
  cost[i] = tonumber(ARGV[a + 3]); shadow[i] = ARGV[a + 4] == '1'; reserve[i] = tonumber(ARGV[a + 5])
  a = a + 6
  key[i] = KEYS[k]
  v1[i] = tonumber(redis.call('GET', KEYS[k]))
  k = k + 1
  if algo[i] == 2 then
    v2[i] = tonumber(redis.call('GET', KEYS[k])) or 0
    k = k + 1
  end
  local w, l, c = win[i], lim[i], cost[i]
  if algo[i] == 1 then
    fits[i] = (v1[i] or 0) + c <= l
  elseif algo[i] == 2 then
    local elapsed = now - (now - now % w)
    fits[i] = v2[i] * (w - elapsed) / w + (v1[i] or 0) + c <= l
  elseif algo[i] == 4 then
    fits[i] = true
  elseif l == 0 then
    fits[i] = c == 0
  else
    local base = math.max(v1[i] or now, now)
    fits[i] = base + (w / l) * c - now <= w + EPS
  end
  if not fits[i] and not shadow[i] then admitted = false end
end
local out = {}
for i = 1, n do
  local w, l, c, ok = win[i], lim[i], cost[i], fits[i]
  local consume = admitted and ok
  local remaining, reset, retry
  local leased = 0
  if algo[i] == 1 then
    local count = v1[i] or 0
    reset = (now - now % w) + w - now
    if consume then
      leased = lease(reserve[i], l - count - c)
      count = redis.call('INCRBY', key[i], c + leased)
      redis.call('PEXPIRE', key[i], reset + KEEP)
    end
    remaining = math.max(0, l - count)
    retry = ok and 0 or reset
  elseif algo[i] == 2 then
    local curr, prev = v1[i] or 0, v2[i]
    local elapsed = now - (now - now % w)
    reset = w - elapsed
    local estimate = prev * (w - elapsed) / w + curr
    if consume then
      leased = lease(reserve[i], l - estimate - c)
      redis.call('INCRBY', key[i], c + leased)
      redis.call('PEXPIRE', key[i], reset + w + KEEP)
      estimate = estimate + c + leased
    end
    remaining = math.max(0, math.floor(l - estimate))
    if ok then
      retry = 0
    elseif c > l then
      retry = reset
    elseif curr + c > l then
      local e = least(function(x) return curr * (w - x) / w + 0 + c <= l end,
        math.ceil(w * (1.0 - (l - c) / curr) - ROUNDING), 0)
      retry = reset + e
    else
      local e = least(function(x) return prev * (w - x) / w + curr + c <= l end,
        math.ceil(w - (l - c - curr) * w / prev - ROUNDING), elapsed)
      retry = math.max(1, e - elapsed)
    end
  elseif algo[i] == 4 then
    local count
    reset = (now - now % w) + w - now
    if c > 0 then
      count = redis.call('INCRBY', key[i], c)
      redis.call('PEXPIRE', key[i], reset + KEEP)
    else
      count = tonumber(redis.call('GET', key[i])) or 0
    end
    ok = count <= l
    remaining = ok and (l - count) or 0
    retry = ok and 0 or reset
  elseif l == 0 then
    remaining, reset = 0, w
    retry = ok and 0 or w
  else
    local interval = w / l
    local base = math.max(v1[i] or now, now)
    local new = base + interval * c
    local after = base
    if consume then
      after = new
      redis.call('SET', key[i], string.format('%.17g', new), 'PX', math.ceil(new) - now + KEEP)
    end
    remaining = math.max(0, math.floor((w - (after - now)) / interval + 1e-6))
    reset = math.ceil(after - now)
    if ok then
      retry = 0
    elseif interval * c > w + EPS then
      retry = w
    else
      retry = least(function(r) return math.max(base, now + r) + interval * c - (now + r) <= w + EPS end,
        math.ceil(new - w - now - EPS), 1)
    end
  end
  out[#out + 1] = ok and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
  out[#out + 1] = leased
end
return out
"""
LUA_SHA = hashlib.sha1(LUA.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


def encode(group: Group, now_ms: int) -> tuple[list[str], list[int]]:
    """A group → the script's KEYS and ARGV."""
    keys: list[str] = []
    args: list[int] = [now_ms, len(group)]
    for check in group:
        keys.extend(algorithms.state_keys(check, now_ms))
        args += (CODE[check.algorithm], check.limit, check.window_ms, check.cost, int(check.shadow), check.reserve)
    return keys, args


def decode(reply: Sequence[int]) -> list[Outcome]:
    return [
        Outcome(bool(reply[i]), reply[i + 1], reply[i + 2], reply[i + 3], reply[i + 4]) for i in range(0, len(reply), 5)
    ]


# one child each, resolved once: these run per Redis round trip
_STORE_ERRORS_METRIC = telemetry.STORE_ERRORS.labels("ratelimit", "redis")
_STORE_SECONDS = telemetry.STORE_SECONDS.labels("ratelimit", "redis")
# Set when the breaker opens or closes, whoever asked (the RLS or authz's in-process limiter).
STORE_DEGRADED = telemetry.STORE_DEGRADED.labels("ratelimit", "counters")


# --- circuit breaker ----------------------------------------------------------------------


class CircuitBreaker:
    """Closed → (``threshold`` failures in a row) → open for ``cooldown`` → half-open: one probe →
    closed or open again.

    Failures count only when they are separate events: a batch that was already in flight when
    the last failure was recorded does not count again. A pause of the event loop (a busy host,
    a garbage collection) makes every batch in flight miss its timeout at once; that is one
    failure, and the next batch that succeeds resets the count. A Redis that is down fails batch
    after batch and opens the breaker after ``threshold`` of them.

    The cooldown starts at ``base`` and doubles while probes fail, up to ``cap``: a dead store is
    retried a few times a second, never by every request, and the breaker closes within ``cap``
    (and one round trip) of Redis answering again.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, base: float = 0.1, cap: float = 0.5, threshold: int = 3
    ) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.threshold = threshold
        self.state = self.CLOSED
        self.cooldown = base
        self.retry_at = 0.0
        self.failures = 0  # separate failures since the last success
        self.failed_at = -math.inf  # when the last one was recorded

    def rejecting(self) -> bool:
        """True while calls must fail at once (open and cooling down, or a probe under way)."""
        if self.state == self.CLOSED:
            return False
        return self.state == self.HALF_OPEN or self.clock() < self.retry_at

    def allow(self) -> bool:
        """May a call go out now? In the open state, the first call after the cooldown is the probe."""
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and self.clock() >= self.retry_at:
            self.state = self.HALF_OPEN
            return True
        return False

    def success(self) -> bool:
        """Record a success; True when this closes the breaker."""
        recovered = self.state != self.CLOSED
        self.state = self.CLOSED
        self.cooldown = self.base
        self.failures = 0
        return recovered

    def failure(self, started: float | None = None, *, sustained: bool = False) -> bool:
        """Record a failure of a call sent at ``started`` (now when None); True when this opens a
        closed breaker. ``sustained``: the call kept failing for a while (connecting at start),
        which opens the breaker at once."""
        now = self.clock()
        if self.state == self.OPEN:
            return False
        if self.state == self.CLOSED and not sustained:
            if started is not None and started < self.failed_at:
                return False  # in flight when the last failure was recorded: the same event
            self.failed_at = now
            self.failures += 1
            if self.failures < self.threshold:
                return False
        opened = self.state == self.CLOSED
        self.cooldown = self.base if opened else min(self.cap, self.cooldown * 2)
        self.state = self.OPEN
        self.retry_at = now + self.cooldown
        return opened


# --- Redis --------------------------------------------------------------------------------

_STORE_ERRORS = (redis_errors.RedisError, OSError, TimeoutError)
PROBE_TIMEOUT = 0.5  # seconds a background probe may take to reconnect and load the script
_REDIRECTED = (redis_errors.MovedError, redis_errors.AskError, redis_errors.TryAgainError)


@dataclass(slots=True)
class _Job:
    groups: Sequence[Group]
    now_ms: int
    future: asyncio.Future[list[Answer]]


class RedisStore:
    """Counters in Redis or Redis Cluster; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.05,
        breaker: CircuitBreaker | None = None,
        max_batch: int = 512,
        max_in_flight: int = 4,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.cluster = False
        self.errors = 0  # batches that failed, for stats
        self._client: Redis | RedisCluster | None = None
        self._nodes: dict[str, Redis] = {}  # Cluster: a plain client per primary, for pipelines
        self._node_address: dict[str, tuple[str, int]] = {}
        self._connecting = asyncio.Lock()
        self._pending: list[_Job] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def degraded(self) -> bool:
        return self.breaker.state != CircuitBreaker.CLOSED

    async def warm(self, within: float = 2.0) -> bool:
        """Connect and load the script ahead of traffic; False (logged) when Redis is not there
        yet — requests then follow ``on_store_error`` until it is."""
        try:
            async with asyncio.timeout(within):
                await self._connect()
        except _STORE_ERRORS as exc:
            self._failed(exc, sustained=True)
            return False
        return True

    async def apply(self, groups: Sequence[Group], now_ms: int) -> list[Answer]:
        if not groups:
            return []
        if self.breaker.state != CircuitBreaker.CLOSED:
            if self.breaker.allow():  # the cooldown is over: probe in the background
                self._spawn(self._probe())
            return [StoreUnavailable("circuit open")] * len(groups)
        future: asyncio.Future[list[Answer]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(groups, now_ms, future))
        self._kick()
        return await future

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self) -> None:
        """Reconnect and load the script, apart from any request: a request never waits on a
        probe, and the probe gets ``PROBE_TIMEOUT`` (a fresh connection to a Redis that has
        just come back takes a few round trips). Success closes the breaker."""
        try:
            async with asyncio.timeout(max(self.timeout, PROBE_TIMEOUT)):
                await self._connect()
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return
        except BaseException:
            self.breaker.failure()  # a bug or a shutdown: never leave the breaker half-open
            raise
        self._recovered()

    def _recovered(self) -> None:
        if self.breaker.success():
            STORE_DEGRADED.set(0)
            log.warning("counter store recovered", extra=logs.fields(store="redis", cluster=self.cluster))

    def _kick(self) -> None:
        if not self._scheduled and self._pending and self._in_flight < self.max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Send what queued during this loop turn: up to ``max_batch`` requests per pipeline."""
        self._scheduled = False
        while self._pending and self._in_flight < self.max_in_flight:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Job]) -> None:
        try:
            if self.breaker.state != CircuitBreaker.CLOSED:  # opened while this batch queued
                self._fail(batch, StoreUnavailable("circuit open"))
                return
            started = time.perf_counter()
            sent = self.breaker.clock()
            try:
                async with asyncio.timeout(self.timeout):
                    answers = await self._execute(batch)
            except _STORE_ERRORS as exc:
                _STORE_ERRORS_METRIC.inc()
                self._failed(exc, sent)
                self._fail(batch, StoreUnavailable(_describe(exc)))
                return
            _STORE_SECONDS.observe(time.perf_counter() - started)  # one round trip per batch
            self._recovered()
            for job, answer in zip(batch, answers, strict=True):
                if not job.future.done():
                    job.future.set_result(answer)
        except BaseException as exc:  # a bug, or cancellation at shutdown: never leave a caller waiting
            self._fail(batch, StoreUnavailable(f"internal: {exc!r}"))
            if not isinstance(exc, Exception):
                raise
            log.exception("unexpected error in the Redis batch")
        finally:
            self._in_flight -= 1
            self._kick()

    @staticmethod
    def _fail(batch: list[_Job], error: StoreUnavailable) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_result([error] * len(job.groups))

    def _failed(self, exc: BaseException, sent: float | None = None, *, sustained: bool = False) -> None:
        self.errors += 1
        if self.breaker.failure(sent, sustained=sustained):
            STORE_DEGRADED.set(1)
            log.warning(
                "counter store unavailable: rules decide by on_store_error until it is back",
                extra=logs.fields(store="redis", error=_describe(exc), degraded=True),
            )
        # Reconnect on the next probe; close these in the background.
        clients = [c for c in (self._client, *self._nodes.values()) if c is not None]
        self._client, self._nodes = None, {}
        for client in clients:
            self._spawn(_close_quietly(client))

    async def _connect(self) -> Redis | RedisCluster:
        async with self._connecting:
            if self._client is not None:
                return self._client
            options = self._options()
            single = Redis.from_url(self.url, **options)
            client: Redis | RedisCluster = single
            try:
                info = await single.info("cluster")
                if info.get("cluster_enabled"):
                    await single.aclose()
                    client = RedisCluster.from_url(self.url, **options)
                    await client.initialize()
                    self.cluster = True
                await client.script_load(LUA)  # on every primary of a cluster
            except BaseException:
                await _close_quietly(client)
                raise
            self._client = client
            return client

    async def _execute(self, batch: list[_Job]) -> list[list[Answer]]:
        client = await self._connect()
        groups = [(job, group) for job in batch for group in job.groups]
        replies = await self._send(client, groups)
        if any(isinstance(reply, redis_errors.NoScriptError) for reply in replies):
            await client.script_load(LUA)  # flushed, or a failover to a replica without it
            replies = await self._send(client, groups)
        answers: list[list[Answer]] = [[] for _ in batch]
        index = {id(job): i for i, job in enumerate(batch)}
        for (job, _group), reply in zip(groups, replies, strict=True):
            answer = StoreUnavailable(_describe(reply)) if isinstance(reply, Exception) else decode(reply)
            answers[index[id(job)]].append(answer)
        return answers

    async def _send(self, client: Redis | RedisCluster, groups: list[tuple[_Job, Group]]) -> list[Any]:
        if isinstance(client, Redis):
            return await self._pipeline(client, groups)
        return await self._cluster_pipelines(client, groups)

    async def _cluster_pipelines(self, cluster: RedisCluster, groups: list[tuple[_Job, Group]]) -> list[Any]:
        """One pipeline per primary, sent at once; a group whose slot moved goes through
        redis-py's cluster client, which follows the redirection and learns the new layout.

        (redis-py refuses EVALSHA in its own cluster pipelines, hence this.)
        """
        by_node: dict[str, list[int]] = {}
        for i, (job, group) in enumerate(groups):
            node = cluster.get_node_from_key(algorithms.state_keys(group[0], job.now_ms)[0])
            if node is None:
                raise redis_errors.ClusterDownError("no node serves this slot")
            by_node.setdefault(node.name, []).append(i)
            self._node_address.setdefault(node.name, (node.host, int(node.port)))
        replies: list[Any] = [None] * len(groups)

        async def one(name: str, indices: list[int]) -> None:
            answers = await self._pipeline(self._node_client(name), [groups[i] for i in indices])
            for i, answer in zip(indices, answers, strict=True):
                replies[i] = answer

        await asyncio.gather(*(one(name, indices) for name, indices in by_node.items()))
        for i, reply in enumerate(replies):
            if isinstance(reply, _REDIRECTED):
                job, group = groups[i]
                keys, args = encode(group, job.now_ms)
                try:
                    replies[i] = await cluster.evalsha(LUA_SHA, len(keys), *keys, *args)
                except redis_errors.ResponseError as exc:
                    replies[i] = exc
        return replies

    def _node_client(self, name: str) -> Redis:
        client = self._nodes.get(name)
        if client is None:
            host, port = self._node_address[name]
            client = self._nodes[name] = Redis(host=host, port=port, **self._options())
        return client

    def _options(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": Retry(NoBackoff(), 0),
        }

    @staticmethod
    async def _pipeline(client: Redis | RedisCluster, groups: list[tuple[_Job, Group]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for job, group in groups:
            keys, args = encode(group, job.now_ms)
            pipe.evalsha(LUA_SHA, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._fail(self._pending, StoreUnavailable("closed"))
        self._pending = []
        clients = [c for c in (self._client, *self._nodes.values()) if c is not None]
        self._client, self._nodes = None, {}
        for client in clients:
            await _close_quietly(client)


async def _close_quietly(client: Redis | RedisCluster) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:200]
