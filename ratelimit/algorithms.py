"""Window math of the three algorithms: state and the time in, an outcome and the new state out.

Pure functions over integer milliseconds, with no clock of their own (the caller passes ``now``),
so tests drive them with a fake clock. The Redis backend runs the same arithmetic in Lua
(``store.LUA``), operation for operation in the same order, so both backends agree to the last
bit; an integration test runs one sequence through both.

* ``fixed_window``: a counter per clock-aligned window (``now - now % window``), as Envoy's
  reference service counts.
* ``sliding_window``: the current window's counter plus the previous one's, weighted by how
  much of the previous window the sliding window still covers.
* ``gcra``: the generic cell rate algorithm, a token bucket of ``limit`` tokens refilled at
  ``limit / window``, kept as one number: the theoretical arrival time (TAT) of the next request.

A *group* is the limits that one request must pass on one partition (one Redis hash tag):
they are decided together, and a request that any enforcing limit refuses consumes from none
of them, so a burst limit's refusal does not eat the daily quota.

*Leases* (window algorithms): an admitted check may also take up to ``reserve`` more units in
the same step, for the replica to hand out to its next requests without a round trip
(``limiter.Leases``). A lease is never more than ``1 / LEASE_SHARE`` of what the window has left,
so leases shrink to nothing as a limit nears and the last units are always counted one by one.
A reserved unit is counted like a used one: a limit never admits more than its requests; units
still held when the window ends are the most it can admit fewer.

* ``counted``: the fixed window of Envoy's reference service, for its config format. Every hit
  adds its cost to the counter, refused or not, and the answer comes from the count after the
  hit (over the limit when it passes it). A cost of 0 only reads. Checks of this kind take no part
  in the all-or-nothing rule of a group, and two checks of one key in a group count one after the
  other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

FIXED: Final = "fixed_window"
SLIDING: Final = "sliding_window"
GCRA: Final = "gcra"
COUNTED: Final = "counted_fixed_window"  # reference-format limits (ratelimit/reference.py)
CODE = {FIXED: 1, SLIDING: 2, GCRA: 3, COUNTED: 4}  # as the Lua script knows them
# GCRA keeps fractional times; sums of fractions may miss an exact boundary by a rounding error.
EPSILON_MS = 0.001
ROUNDING = 1e-6  # closed-form waits are nudged down by this, then checked (see ``least``)
KEEP_MS = 1000  # state outlives its last use by this much, so clock skew between replicas is harmless
LEASE_SHARE = 8  # a lease takes at most this fraction (1/8) of what the window has left


@dataclass(frozen=True, slots=True)
class Check:
    """One limit to pass: ``cost`` units against ``limit`` per ``window_ms``, counted under ``key``."""

    key: str
    algorithm: str
    limit: int
    window_ms: int
    cost: int = 1
    shadow: bool = False  # counted and reported, never refuses
    reserve: int = 0  # window algorithms: up to this many more units to lease when admitted


@dataclass(frozen=True, slots=True)
class Outcome:
    """A limit's answer. ``remaining`` is after this request; ``reset_ms`` is until the window
    ends (the bucket is full again for GCRA); ``retry_ms`` is 0 when ``ok``, else until a
    request of the same cost could pass."""

    ok: bool
    remaining: int
    reset_ms: int
    retry_ms: int
    leased: int = 0  # units reserved beyond ``cost`` (counted, not in ``remaining``)


def window_start(now_ms: int, window_ms: int) -> int:
    return now_ms - now_ms % window_ms


def state_keys(check: Check, now_ms: int) -> tuple[str, ...]:
    """The store keys a check reads: the window's counter (and the previous one), or the TAT."""
    if check.algorithm == GCRA:
        return (check.key,)
    start = window_start(now_ms, check.window_ms)
    if check.algorithm in (FIXED, COUNTED):
        return (f"{check.key}:{start}",)
    return (f"{check.key}:{start}", f"{check.key}:{start - check.window_ms}")


# --- fixed window -------------------------------------------------------------------------


def fixed_fits(count: float, check: Check) -> bool:
    return count + check.cost <= check.limit


def lease(check: Check, room: float) -> int:
    """Units to reserve beyond the cost, when ``room`` units would be left after it."""
    if check.reserve <= 0 or room < LEASE_SHARE:
        return 0
    return min(check.reserve, math.floor(room / LEASE_SHARE))


def fixed_outcome(count: float, check: Check, now_ms: int, consume: bool) -> tuple[Outcome, float]:
    """``count`` so far in this window → (outcome, count after)."""
    fits = fixed_fits(count, check)
    leased = lease(check, check.limit - count - check.cost) if consume and fits else 0
    after = count + check.cost + leased if consume and fits else count
    reset = window_start(now_ms, check.window_ms) + check.window_ms - now_ms
    return Outcome(fits, int(max(0, check.limit - after)), reset, 0 if fits else reset, leased), after


def counted_outcome(count: float, check: Check, now_ms: int) -> tuple[Outcome, float]:
    """The reference's answer: ``count`` so far → (outcome, count after adding the cost).

    Over means the count after the hit passed the limit; the remaining is then 0.
    """
    after = count + check.cost
    ok = after <= check.limit
    reset = window_start(now_ms, check.window_ms) + check.window_ms - now_ms
    return Outcome(ok, int(check.limit - after) if ok else 0, reset, 0 if ok else reset), after


# --- sliding window -----------------------------------------------------------------------


def sliding_estimate(previous: float, current: float, elapsed: int, window: int) -> float:
    return float(previous) * float(window - elapsed) / float(window) + current


def sliding_fits(previous: float, current: float, check: Check, now_ms: int) -> bool:
    elapsed = now_ms - window_start(now_ms, check.window_ms)
    return sliding_estimate(previous, current, elapsed, check.window_ms) + check.cost <= check.limit


def sliding_outcome(previous: float, current: float, check: Check, now_ms: int, consume: bool) -> tuple[Outcome, float]:
    """Counts of the previous and current windows → (outcome, current count after)."""
    window, limit, cost = check.window_ms, check.limit, check.cost
    elapsed = now_ms - window_start(now_ms, window)
    reset = window - elapsed
    estimate = sliding_estimate(previous, current, elapsed, window)
    fits = estimate + cost <= limit
    consumed = consume and fits
    leased = lease(check, limit - estimate - cost) if consumed else 0
    after = current + cost + leased if consumed else current
    estimate_after = estimate + cost + leased if consumed else estimate
    remaining = max(0, math.floor(limit - estimate_after))
    retry = 0 if fits else _sliding_retry(previous, current, elapsed, reset, check)
    return Outcome(fits, remaining, reset, retry, leased), after


def _sliding_retry(previous: float, current: float, elapsed: int, reset: int, check: Check) -> int:
    """How long until ``cost`` more fits, if nobody else counts meanwhile."""
    window, limit, cost = check.window_ms, check.limit, check.cost
    if cost > limit:
        return reset  # never fits: try again after this window
    if current + cost > limit:
        # Not in this window: in the next, this window's count becomes the weighted previous one.
        guess = math.ceil(float(window) * (1.0 - float(limit - cost) / float(current)) - ROUNDING)
        wait = least(lambda e: sliding_estimate(current, 0, e, window) + cost <= limit, guess, 0)
        return reset + wait
    # In this window, once enough of the previous window has slid out.
    guess = math.ceil(float(window) - float(limit - cost - current) * float(window) / float(previous) - ROUNDING)
    at = least(lambda e: sliding_estimate(previous, current, e, window) + cost <= limit, guess, elapsed)
    return max(1, at - elapsed)


def least(fits: Callable[[int], bool], guess: int, floor: int) -> int:
    """The least whole ``x >= floor`` that ``fits``, from a closed-form ``guess`` that floating
    point may have put one off: checked against ``fits`` itself, so ``retry`` is exact."""
    x = max(floor, guess)
    for _ in range(3):
        if fits(x):
            break
        x += 1
    for _ in range(3):
        if x > floor and fits(x - 1):
            x -= 1
    return x


# --- GCRA ---------------------------------------------------------------------------------


def gcra_fits(tat: float | None, check: Check, now_ms: int) -> bool:
    if check.limit == 0:
        return check.cost == 0
    interval = check.window_ms / check.limit
    base = now_ms if tat is None else max(tat, now_ms)
    return base + interval * check.cost - now_ms <= check.window_ms + EPSILON_MS


def gcra_outcome(tat: float | None, check: Check, now_ms: int, consume: bool) -> tuple[Outcome, float | None]:
    """The stored TAT (None when absent) → (outcome, TAT after; None: nothing to store)."""
    window, limit, cost = check.window_ms, check.limit, check.cost
    if limit == 0:
        fits = cost == 0
        return Outcome(fits, 0, window, 0 if fits else window), None
    interval = window / limit
    base = now_ms if tat is None else max(tat, now_ms)
    new = base + interval * cost
    fits = new - now_ms <= window + EPSILON_MS
    consumed = consume and fits
    after = new if consumed else base
    remaining = max(0, math.floor((window - (after - now_ms)) / interval + 1e-6))
    reset = math.ceil(after - now_ms)
    if fits:
        retry = 0
    elif interval * cost > window + EPSILON_MS:
        retry = window  # more than the whole bucket: never fits
    else:
        guess = math.ceil(new - window - now_ms - EPSILON_MS)
        retry = least(lambda r: max(base, now_ms + r) + interval * cost - (now_ms + r) <= window + EPSILON_MS, guess, 1)
    return Outcome(fits, remaining, reset, retry), (new if consumed else None)


# --- a group, over a plain mapping (the in-memory backend) --------------------------------


def expiry_ms(check: Check, now_ms: int, state: float) -> int:
    """When the state written for ``check`` at ``now_ms`` stops mattering (absolute ms)."""
    if check.algorithm == GCRA:
        return math.ceil(state) + KEEP_MS
    if check.algorithm == COUNTED:
        return window_start(now_ms, check.window_ms) + check.window_ms + KEEP_MS
    end = window_start(now_ms, check.window_ms) + check.window_ms
    return end + (check.window_ms if check.algorithm == SLIDING else 0) + KEEP_MS


def evaluate_group(
    checks: Sequence[Check], read: Sequence[tuple[float | None, ...]], now_ms: int
) -> tuple[list[Outcome], list[float | None]]:
    """Decide a group: ``read[i]`` holds the values of ``state_keys(checks[i])`` (None if absent).

    Returns the outcomes and, per check, the new value of its first key (None: unchanged).
    """
    fits = []
    for check, values in zip(checks, read, strict=True):
        if check.algorithm == FIXED:
            fits.append(fixed_fits(values[0] or 0, check))
        elif check.algorithm == SLIDING:
            fits.append(sliding_fits(values[1] or 0, values[0] or 0, check, now_ms))
        else:
            fits.append(gcra_fits(values[0], check, now_ms))
    admitted = all(ok or check.shadow for ok, check in zip(fits, checks, strict=True))
    outcomes: list[Outcome] = []
    writes: list[float | None] = []
    for check, values in zip(checks, read, strict=True):
        if check.algorithm == FIXED:
            outcome, after = fixed_outcome(values[0] or 0, check, now_ms, admitted)
            written: float | None = after if admitted and outcome.ok else None
        elif check.algorithm == SLIDING:
            outcome, after = sliding_outcome(values[1] or 0, values[0] or 0, check, now_ms, admitted)
            written = after if admitted and outcome.ok else None
        else:
            outcome, written = gcra_outcome(values[0], check, now_ms, admitted)
        outcomes.append(outcome)
        writes.append(written)
    return outcomes, writes
