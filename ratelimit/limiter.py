"""The rate-limit decision: a request's descriptors in, a ``Verdict`` out. No grpc, no sockets.

``Limiter.decide`` matches the descriptors against the limits in force (``limits.py``), groups
the hits by partition (one group is one atomic store call), answers groups that are already
over a limit from the local over-limit cache without asking the store, answers groups whose
window counters this replica holds leased units of (``Leases``) without asking either, asks the
injected ``Store`` for the rest (one batched round trip, leasing more units as it counts),
applies each rule's ``on_store_error`` when the store cannot answer (``allow``, ``deny``, or
``local``: an in-process token bucket of limit / expected replicas), and builds what Envoy
needs: a code per descriptor, the ``RateLimit-Policy`` / ``RateLimit`` fields (or
``X-RateLimit-*``), ``Retry-After`` and a JSON body on 429. Shadow-mode rules are counted and
reported in stats, and never deny.

Domains of reference-format files are decided as Envoy's reference service decides them
(``decide_reference``): every hit counts, refused or not, unless ``ReferenceOptions`` asks to stop
counting a request that goes over; headers only when asked for, under the reference's names; no
body. ``ReferenceOptions`` carries the reference's settings that change answers.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from ratelimit.algorithms import COUNTED, GCRA, Check, Outcome, window_start
from ratelimit.errors import StoreUnavailable
from ratelimit.limits import Hit, Limits, Request, Rule, counter_suffix
from ratelimit.store import MemoryStore, Store

JSON = "application/json"
RATE_LIMITED = "rate_limited"
RATE_LIMITED_MESSAGE = "too many requests: slow down and retry after the time in Retry-After"
# on_store_error: deny refuses because the counters cannot be read, not because the client is
# over: a reason of its own in the body, the metrics and the logs, and no RateLimit field.
STORE_UNAVAILABLE = "rate_limit_store_unavailable"
STORE_UNAVAILABLE_MESSAGE = (
    "the rate-limit store cannot be reached and this limit fails closed; retry after Retry-After"
)
OVER_LIMIT = "over_limit"
HEADER_MODES = ("ietf", "x-ratelimit", "off")
DENY_RETRY_MS = 1_000  # on_store_error: deny — when to try again
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Status:
    """One descriptor's answer: over or under, and the rule that constrains it most."""

    ok: bool = True
    rule: Rule | None = None
    remaining: int = 0
    reset_ms: int = 0
    unlimited: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    statuses: tuple[Status, ...]
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""  # the 429 body (JSON)
    # Why a refused request was refused: ``OVER_LIMIT``, or ``STORE_UNAVAILABLE`` when every limit
    # that refused it did so by ``on_store_error: deny`` (its counters could not be read).
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ReferenceOptions:
    """The settings of Envoy's reference service that change its answers (same meanings)."""

    headers: bool = False  # LIMIT_RESPONSE_HEADERS_ENABLED
    limit_header: str = "RateLimit-Limit"  # LIMIT_LIMIT_HEADER
    remaining_header: str = "RateLimit-Remaining"  # LIMIT_REMAINING_HEADER
    reset_header: str = "RateLimit-Reset"  # LIMIT_RESET_HEADER
    stop_increment: bool = False  # STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT
    global_shadow: bool = False  # SHADOW_MODE: an over-limit request is answered OK overall


class OverLimitCache:
    """Keys known to be over their limit, until when, and for which cost: those skip the store.

    Being over can only end with time (other replicas only add hits), so a key refused until T
    for cost c is refused locally until T for any cost ≥ c.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._until: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._until)

    def drop(self, suffixes: tuple[str, ...]) -> None:
        """Forget every counter whose key ends with one of ``suffixes``."""
        self._until = {k: v for k, v in self._until.items() if not k.endswith(suffixes)}

    def blocked_for(self, key: str, cost: int, now_ms: int) -> int:
        """Milliseconds until ``key`` could take ``cost``, or 0 when the cache does not know."""
        entry = self._until.get(key)
        if entry is None:
            return 0
        until, cached_cost = entry
        if until <= now_ms:
            del self._until[key]
            return 0
        return until - now_ms if cost >= cached_cost else 0

    def add(self, key: str, until_ms: int, cost: int, now_ms: int) -> None:
        if len(self._until) >= self.max_entries:
            self._until = {k: v for k, v in self._until.items() if v[0] > now_ms}
            if len(self._until) >= self.max_entries:
                self._until.clear()
        self._until[key] = (until_ms, cost)

    def clear(self) -> None:
        self._until.clear()


class Leases:
    """Units this replica reserved in the shared store (counted there already) and not yet used,
    per counter and window: a request they cover is decided here, with no round trip.

    A lease is only good in the window it was counted in. ``remaining`` is what the store had
    left when the units were leased, plus the units still held: at most what is left now.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._held: dict[str, tuple[int, int, int]] = {}  # key → (window start, units, remaining)

    def drop(self, suffixes: tuple[str, ...]) -> None:
        """Forget the units of every counter whose key ends with one of ``suffixes``."""
        self._held = {k: v for k, v in self._held.items() if not k.endswith(suffixes)}

    def units(self) -> int:
        """Units held in all (what a window's end would leave unused)."""
        return sum(entry[1] for entry in self._held.values())

    def covers(self, key: str, cost: int, start: int) -> bool:
        entry = self._held.get(key)
        return entry is not None and entry[0] == start and entry[1] >= cost

    def take(self, key: str, cost: int) -> int:
        """Use ``cost`` units (``covers`` said yes); the remaining to report."""
        start, units, remaining = self._held[key]
        units -= cost
        if units:
            self._held[key] = (start, units, remaining)
        else:
            del self._held[key]
        return remaining + units

    def add(self, key: str, start: int, units: int, remaining: int) -> int:
        """Hold ``units`` more for the window at ``start``; the remaining to report."""
        entry = self._held.get(key)
        if entry is not None and entry[0] == start:
            units += entry[1]
            remaining = min(remaining, entry[2])
        elif len(self._held) >= self.max_entries:
            self._held.clear()  # forgotten units are only fewer admissions, never more
        self._held[key] = (start, units, remaining)
        return remaining + units

    def clear(self) -> None:
        self._held.clear()


class Limiter:
    """Decides requests; holds the limits in force, the store, the caches and the stats.

    ``lease``: the most units one replica reserves per counter and round trip (window
    algorithms, limits of 100 and more: at most 1 % of the limit). 0 asks the store for every
    request. Only worth it with a shared store, where a round trip costs.
    """

    def __init__(
        self,
        limits: Limits,
        store: Store,
        clock: Clock,
        *,
        headers: str = "ietf",
        expected_replicas: int = 1,
        over_limit_cache: bool = True,
        lease: int = 0,
        reference: ReferenceOptions | None = None,
    ) -> None:
        if headers not in HEADER_MODES:
            raise ValueError(f"headers must be one of {HEADER_MODES}")
        self.limits = limits
        self.store = store
        self.clock = clock
        self.headers = headers
        self.expected_replicas = expected_replicas
        self.cache = OverLimitCache() if over_limit_cache else None
        self.lease = lease
        self.leases = Leases()
        self.fallback = MemoryStore()  # on_store_error: local
        self.stats: Counter[str] = Counter()
        self.reference = reference or ReferenceOptions()

    @property
    def degraded(self) -> bool:
        return self.store.degraded

    def reload(
        self,
        limits: Limits,
        *,
        headers: str | None = None,
        expected_replicas: int | None = None,
        lease: int | None = None,
    ) -> None:
        """Put new limits in force. Leased units and cached refusals stay for the rules that did
        not change (same id, same numbers); those of changed or removed rules are dropped."""
        kept = {rule.id: rule for rule in limits.rules()}
        stale = tuple(counter_suffix(rule) for rule in self.limits.rules() if kept.get(rule.id) != rule)
        self.limits = limits
        if stale:
            self.leases.drop(stale)
            if self.cache is not None:
                self.cache.drop(stale)
        if lease is not None:
            self.lease = lease
        if headers is not None:
            self.headers = headers
        if expected_replicas is not None:
            self.expected_replicas = expected_replicas

    def now_ms(self) -> int:
        return round(self.clock() * 1000)

    async def decide(self, request: Request) -> Verdict:
        match = self.limits.match(request)
        self.stats["decisions"] += 1
        if not match.hits:
            return Verdict(True, tuple(Status(unlimited=i in match.unlimited) for i in range(len(request.descriptors))))
        if match.reference:
            return await self.decide_reference(request, match.hits, match.unlimited)
        now = self.now_ms()
        groups: dict[str, list[Hit]] = {}
        for hit in match.hits:
            groups.setdefault(hit.tag, []).append(hit)
        outcomes: dict[int, Outcome] = {}  # id(hit) → outcome; a hit without one was not evaluated
        to_store: list[list[Hit]] = []
        for hits in groups.values():
            if not self._from_cache(hits, now, outcomes) and not self._from_leases(hits, now, outcomes):
                to_store.append(hits)
        unread: set[int] = set()  # hits refused by on_store_error: deny
        if to_store:
            checks = [[self._check(hit) for hit in hits] for hits in to_store]
            answers = await self.store.apply(checks, now)
            for hits, answer in zip(to_store, answers, strict=True):
                if isinstance(answer, StoreUnavailable):
                    unread |= self._on_store_error(hits, now, outcomes)
                else:
                    self._record(hits, answer, now, outcomes)
        return self._verdict(request, match.hits, match.unlimited, outcomes, unread)

    async def decide_reference(self, request: Request, hits: Sequence[Hit], unlimited: frozenset[int]) -> Verdict:
        """A reference-format domain, decided as envoyproxy/ratelimit decides it.

        Each hit adds its cost to its counter and is over when the count passes the limit (the
        same key twice in a request counts twice, the second from the running count). With
        ``stop_increment``, the counters are read first: when a hit would go over, only the hits
        that would go over are counted, and when one is already known over (the local cache),
        none is. A key known over answers from the cache without a round trip.
        """
        now = self.now_ms()
        outcomes: dict[int, Outcome] = {}
        pending: list[Hit] = []
        for hit in hits:
            wait = 0 if self.cache is None or hit.rule.shadow else self.cache.blocked_for(hit.key, hit.cost, now)
            if wait:
                outcomes[id(hit)] = Outcome(False, 0, wait, wait)
                self.stats["over_limit_cache_hits"] += 1
                self.stats[f"rule.{hit.stat}.over_limit"] += 1
            else:
                pending.append(hit)
        costs = {id(hit): hit.cost for hit in pending}
        if self.reference.stop_increment and pending:
            if len(outcomes) > 0:
                costs = dict.fromkeys(costs, 0)
            else:
                seen = await self._count(pending, dict.fromkeys(costs, 0), now)
                over = set()
                for hit in pending:
                    read = seen[id(hit)]
                    if isinstance(read, Outcome) and _passes(read, hit.cost):
                        over.add(id(hit))
                if over:
                    costs = {key: cost if key in over else 0 for key, cost in costs.items()}
        answers = await self._count(pending, costs, now)
        failed: list[Hit] = []
        for hit in pending:
            answer = answers[id(hit)]
            if isinstance(answer, StoreUnavailable):
                failed.append(hit)
                continue
            outcomes[id(hit)] = answer
            if answer.ok:
                continue
            if hit.rule.shadow:
                self.stats[f"rule.{hit.stat}.shadow_mode"] += 1
            else:
                self.stats[f"rule.{hit.stat}.over_limit"] += 1
                if self.cache is not None:
                    self.cache.add(hit.key, now + answer.retry_ms, 0, now)  # over stays over, for any cost
        unread = self._on_store_error(failed, now, outcomes) if failed else set()
        return self._reference_verdict(request, hits, unlimited, outcomes, unread)

    async def _count(
        self, hits: Sequence[Hit], costs: dict[int, int], now: int
    ) -> dict[int, Outcome | StoreUnavailable]:
        """Count ``hits`` at ``costs`` (0: only read), one store group per partition."""
        groups: dict[str, list[Hit]] = {}
        for hit in hits:
            groups.setdefault(hit.tag, []).append(hit)
        batches = list(groups.values())
        checks = [
            [Check(h.key, COUNTED, h.rule.limit, h.rule.window_ms, costs[id(h)], h.rule.shadow) for h in batch]
            for batch in batches
        ]
        answers = await self.store.apply(checks, now)
        found: dict[int, Outcome | StoreUnavailable] = {}
        for batch, answer in zip(batches, answers, strict=True):
            for i, hit in enumerate(batch):
                found[id(hit)] = answer if isinstance(answer, StoreUnavailable) else answer[i]
        return found

    def _reference_verdict(
        self,
        request: Request,
        hits: Sequence[Hit],
        unlimited: frozenset[int],
        outcomes: dict[int, Outcome],
        unread: set[int],
    ) -> Verdict:
        per_descriptor: list[list[tuple[Hit, Outcome]]] = [[] for _ in request.descriptors]
        for hit in hits:
            outcome = outcomes.get(id(hit))
            if outcome is not None:
                per_descriptor[hit.index].append((hit, outcome))
        statuses = tuple(_status(pairs, i in unlimited) for i, pairs in enumerate(per_descriptor))
        ok = all(status.ok for status in statuses)
        reason = ""
        if not ok:
            reason = _reason(hits, outcomes, unread)
            self.stats[reason] += 1
            if self.reference.global_shadow:
                self.stats["global_shadow_mode"] += 1
                ok = True
        headers: tuple[tuple[str, str], ...] = ()
        options = self.reference
        limited = [status for status in statuses if status.rule is not None]
        if options.headers and limited:
            least = min(limited, key=lambda status: status.remaining)  # the first of the least, as the reference
            assert least.rule is not None
            headers = (
                (options.limit_header, str(least.rule.limit)),
                (options.remaining_header, str(least.remaining)),
                (options.reset_header, str(_seconds(least.reset_ms))),
            )
        return Verdict(ok, statuses, headers, reason="" if ok else reason)

    def _from_cache(self, hits: list[Hit], now: int, outcomes: dict[int, Outcome]) -> bool:
        if self.cache is None:
            return False
        for hit in hits:
            if hit.rule.shadow:
                continue
            wait = self.cache.blocked_for(hit.key, hit.cost, now)
            if wait:
                outcomes[id(hit)] = Outcome(False, 0, wait, wait)
                self.stats["over_limit_cache_hits"] += 1
                self.stats[f"rule.{hit.stat}.over_limit"] += 1
                return True
        return False

    def _from_leases(self, hits: list[Hit], now: int, outcomes: dict[int, Outcome]) -> bool:
        """Decide the group from leased units when they cover every limit in it."""
        if not self.lease:
            return False
        leases = self.leases
        starts = [window_start(now, hit.rule.window_ms) for hit in hits]
        for hit, start in zip(hits, starts, strict=True):
            if not leases.covers(hit.key, hit.cost, start):
                return False
        for hit, start in zip(hits, starts, strict=True):
            remaining = leases.take(hit.key, hit.cost)
            reset = start + hit.rule.window_ms - now
            outcomes[id(hit)] = Outcome(True, remaining, reset, 0)
        self.stats["leased"] += 1
        return True

    def _check(self, hit: Hit) -> Check:
        rule = hit.rule
        reserve = 0
        if self.lease and rule.algorithm not in (GCRA, COUNTED):
            reserve = min(self.lease, rule.limit // 100)
        return Check(hit.key, rule.algorithm, rule.limit, rule.window_ms, hit.cost, rule.shadow, reserve)

    def _record(self, hits: list[Hit], answer: Sequence[Outcome], now: int, outcomes: dict[int, Outcome]) -> None:
        for hit, answered in zip(hits, answer, strict=True):
            outcome = answered
            if answered.leased:
                start = window_start(now, hit.rule.window_ms)
                remaining = self.leases.add(hit.key, start, answered.leased, answered.remaining)
                outcome = Outcome(True, remaining, answered.reset_ms, 0)
            outcomes[id(hit)] = outcome
            if outcome.ok:
                continue
            if hit.rule.shadow:
                self.stats[f"rule.{hit.stat}.shadow_mode"] += 1
            else:
                self.stats[f"rule.{hit.stat}.over_limit"] += 1
                if self.cache is not None and outcome.retry_ms > 0:
                    self.cache.add(hit.key, now + outcome.retry_ms, hit.cost, now)

    def _on_store_error(self, hits: list[Hit], now: int, outcomes: dict[int, Outcome]) -> set[int]:
        """Decide ``hits`` by their rules' ``on_store_error``; the ids of the hits refused by ``deny``."""
        self.stats["store_errors"] += 1
        local: list[Hit] = []
        unread: set[int] = set()
        for hit in hits:
            policy = hit.rule.on_store_error
            self.stats[f"on_store_error.{policy}"] += 1
            if policy == "deny":
                outcomes[id(hit)] = Outcome(False, 0, DENY_RETRY_MS, DENY_RETRY_MS)
                if not hit.rule.shadow:
                    unread.add(id(hit))
            elif policy == "local":
                local.append(hit)
        if local and not unread:
            answer = self.fallback.decide([self._local_check(hit) for hit in local], now)
            for hit, outcome in zip(local, answer, strict=True):
                outcomes[id(hit)] = outcome
        return unread

    def _local_check(self, hit: Hit) -> Check:
        rule = hit.rule
        share = 0 if rule.limit == 0 else max(1, rule.limit // self.expected_replicas)
        return Check("local:" + hit.key, GCRA, share, rule.window_ms, hit.cost, rule.shadow)

    def _verdict(
        self,
        request: Request,
        hits: Sequence[Hit],
        unlimited: frozenset[int],
        outcomes: dict[int, Outcome],
        unread: AbstractSet[int] = frozenset(),
    ) -> Verdict:
        per_descriptor: list[list[tuple[Hit, Outcome]]] = [[] for _ in request.descriptors]
        shown: list[tuple[Hit, Outcome]] = []
        for hit in hits:
            outcome = outcomes.get(id(hit))
            if outcome is None:
                continue
            per_descriptor[hit.index].append((hit, outcome))
            if not hit.rule.shadow and id(hit) not in unread:  # no RateLimit field for a count never read
                shown.append((hit, outcome))
        statuses = tuple(_status(pairs, i in unlimited) for i, pairs in enumerate(per_descriptor))
        ok = all(status.ok for status in statuses)
        shown.sort(key=lambda pair: (pair[1].ok, pair[1].remaining))
        headers = self._headers(shown)
        if ok:
            return Verdict(True, statuses, headers)
        reason = _reason(hits, outcomes, unread)
        self.stats[reason] += 1
        denying = [(h, o) for h in hits if not h.rule.shadow and (o := outcomes.get(id(h))) is not None and not o.ok]
        if reason == STORE_UNAVAILABLE:
            error, message = STORE_UNAVAILABLE, STORE_UNAVAILABLE_MESSAGE
        else:
            error, message = RATE_LIMITED, RATE_LIMITED_MESSAGE
            denying = [pair for pair in denying if id(pair[0]) not in unread]
        retry = max(1, *(math.ceil(outcome.retry_ms / 1000) for _hit, outcome in denying))
        policies = list(dict.fromkeys(hit.rule.policy for hit, _ in denying))
        body = {"error": error, "message": message, "retry_after": retry, "policies": policies}
        headers += (("retry-after", str(retry)), ("content-type", JSON))
        return Verdict(False, statuses, headers, json.dumps(body) + "\n", reason)

    def _headers(self, shown: list[tuple[Hit, Outcome]]) -> tuple[tuple[str, str], ...]:
        if not shown or self.headers == "off":
            return ()
        if self.headers == "x-ratelimit":
            hit, first = shown[0]
            windows = ", ".join(dict.fromkeys(f"{h.rule.limit};w={_seconds(h.rule.window_ms)}" for h, _ in shown))
            return (
                ("x-ratelimit-limit", f"{hit.rule.limit}, {windows}"),
                ("x-ratelimit-remaining", str(first.remaining)),
                ("x-ratelimit-reset", str(_seconds(first.reset_ms, 0))),
            )
        policies: dict[str, str] = {}
        current: dict[str, str] = {}
        for hit, outcome in shown:
            rule = hit.rule
            name = sf_string(rule.policy)
            policies.setdefault(name, f"{name};q={rule.limit};w={_seconds(rule.window_ms)}")
            current.setdefault(name, f"{name};r={outcome.remaining};t={_seconds(outcome.reset_ms, 0)}")
        return (("ratelimit-policy", ", ".join(policies.values())), ("ratelimit", ", ".join(current.values())))


def lease_size(store: Store, configured: int) -> int:
    """Leases pay off where a round trip costs: a shared store. In memory, 0."""
    return 0 if isinstance(store, MemoryStore) else configured


def _status(pairs: list[tuple[Hit, Outcome]], unlimited: bool) -> Status:
    if not pairs:
        return Status(unlimited=unlimited)
    enforcing = [pair for pair in pairs if not pair[0].rule.shadow] or pairs
    hit, outcome = min(enforcing, key=lambda pair: (pair[1].ok, pair[1].remaining))
    ok = all(o.ok or h.rule.shadow for h, o in pairs)
    return Status(ok, hit.rule, outcome.remaining, outcome.reset_ms)


def _reason(hits: Sequence[Hit], outcomes: dict[int, Outcome], unread: AbstractSet[int]) -> str:
    """``OVER_LIMIT`` when a limit whose counters were read refused the request, else
    ``STORE_UNAVAILABLE``: only ``on_store_error: deny`` refused it."""
    for hit in hits:
        outcome = outcomes.get(id(hit))
        if outcome is not None and not outcome.ok and not hit.rule.shadow and id(hit) not in unread:
            return OVER_LIMIT
    return STORE_UNAVAILABLE if unread else OVER_LIMIT


def _passes(seen: Outcome, cost: int) -> bool:
    """Would ``cost`` more take a counter read as ``seen`` past its limit?"""
    return not seen.ok or cost > seen.remaining


def _seconds(ms: int, minimum: int = 1) -> int:
    """Whole seconds, rounded up: HTTP fields carry no fractions."""
    return max(minimum, math.ceil(ms / 1000))


@functools.lru_cache(maxsize=4096)  # policy names: a few per config, on every response
def sf_string(text: str) -> str:
    """An RFC 8941 sf-string: printable ASCII in quotes, with ``"`` and ``\\`` escaped."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'
