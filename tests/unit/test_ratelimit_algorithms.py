"""Window math of the three algorithms, driven by an injected clock, and group semantics."""

from __future__ import annotations

import random

import pytest

from ratelimit import algorithms
from ratelimit.algorithms import FIXED, GCRA, SLIDING, Check, Outcome
from ratelimit.store import MemoryStore
from tests.conftest import FakeClock

T0 = 1_700_000_040_000  # a multiple of 1 s, 10 s and 1 min: window starts are easy to read


def run(store: MemoryStore, check: Check, clock: FakeClock) -> Outcome:
    (outcome,) = store.decide([check], clock.now_ms)
    return outcome


# --- fixed window -------------------------------------------------------------------------


def test_fixed_window_admits_limit_then_refuses_until_the_clock_aligned_window_ends() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0 + 400)
    check = Check("k", FIXED, limit=3, window_ms=1_000)
    assert [run(store, check, clock) for _ in range(3)] == [
        Outcome(True, 2, 600, 0),
        Outcome(True, 1, 600, 0),
        Outcome(True, 0, 600, 0),
    ]
    assert run(store, check, clock) == Outcome(False, 0, 600, 600)
    clock.advance_ms(599)  # T0 + 999: still the same window
    assert run(store, check, clock) == Outcome(False, 0, 1, 1)
    clock.advance_ms(1)  # T0 + 1000: a new window, whatever happened before
    assert run(store, check, clock) == Outcome(True, 2, 1_000, 0)


def test_fixed_window_of_any_length_is_aligned_to_the_epoch() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0 + 25_000)  # 30 s windows start at multiples of 30 s
    check = Check("k", FIXED, limit=1, window_ms=30_000)
    start = T0 - T0 % 30_000
    assert run(store, check, clock).reset_ms == start + 30_000 - clock.now_ms
    assert not run(store, check, clock).ok
    clock.now_ms = start + 30_000
    assert run(store, check, clock).ok


def test_fixed_window_cost_counts_several_hits_and_a_refused_request_costs_nothing() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    assert run(store, Check("k", FIXED, 10, 1_000, cost=7), clock) == Outcome(True, 3, 1_000, 0)
    assert run(store, Check("k", FIXED, 10, 1_000, cost=4), clock) == Outcome(False, 3, 1_000, 1_000)
    assert run(store, Check("k", FIXED, 10, 1_000, cost=3), clock) == Outcome(True, 0, 1_000, 0)


def test_zero_limit_refuses_everything_but_a_zero_cost_peek() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    for algorithm in (FIXED, SLIDING, GCRA):
        assert not run(store, Check(algorithm, algorithm, 0, 1_000), clock).ok
        assert run(store, Check(algorithm, algorithm, 0, 1_000, cost=0), clock).ok


# --- sliding window -----------------------------------------------------------------------


def test_sliding_window_weighs_the_previous_window_by_its_overlap() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0 + 500)
    check = Check("k", SLIDING, limit=10, window_ms=1_000)
    assert all(run(store, check, clock).ok for _ in range(10))
    assert not run(store, check, clock).ok
    clock.now_ms = T0 + 1_100  # 10 % into the next window: 90 % of the 10 previous hits still count
    assert run(store, check, clock) == Outcome(True, 0, 900, 0)  # 9 + 1 = 10
    refused = run(store, check, clock)
    assert not refused.ok
    # 10 previous * (1000 - e) / 1000 + 1 current + 1 <= 10 from e = 200, i.e. 100 ms from now
    assert refused.retry_ms == 100
    clock.advance_ms(99)
    assert not run(store, check, clock).ok
    clock.advance_ms(1)
    assert run(store, check, clock).ok


def test_sliding_window_retry_when_the_current_window_alone_is_full() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0 + 200)
    check = Check("k", SLIDING, limit=4, window_ms=1_000)
    for _ in range(4):
        assert run(store, check, clock).ok
    refused = run(store, check, clock)
    # Next window: 4 * (1000 - e) / 1000 + 1 <= 4 from e = 250: 800 ms to the window's end + 250.
    assert refused == Outcome(False, 0, 800, 1_050)
    clock.advance_ms(1_049)
    assert not run(store, check, clock).ok
    clock.advance_ms(1)
    assert run(store, check, clock).ok


def test_sliding_window_forgets_a_window_two_windows_back() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    check = Check("k", SLIDING, limit=2, window_ms=1_000)
    assert run(store, check, clock).ok
    assert run(store, check, clock).ok
    clock.now_ms = T0 + 2_000
    assert run(store, check, clock) == Outcome(True, 1, 1_000, 0)


# --- GCRA ---------------------------------------------------------------------------------


def test_gcra_allows_a_burst_of_limit_then_one_per_emission_interval() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0 + 123)  # GCRA has no windows to align to
    check = Check("k", GCRA, limit=4, window_ms=1_000)  # one token per 250 ms
    assert [run(store, check, clock) for _ in range(4)] == [
        Outcome(True, 3, 250, 0),
        Outcome(True, 2, 500, 0),
        Outcome(True, 1, 750, 0),
        Outcome(True, 0, 1_000, 0),
    ]
    assert run(store, check, clock) == Outcome(False, 0, 1_000, 250)
    clock.advance_ms(249)
    assert not run(store, check, clock).ok
    clock.advance_ms(1)
    assert run(store, check, clock) == Outcome(True, 0, 1_000, 0)
    clock.advance_ms(1_000)  # a full window idle: the whole burst again
    assert run(store, check, clock).remaining == 3


def test_gcra_with_an_interval_that_is_not_a_whole_millisecond() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    check = Check("k", GCRA, limit=3, window_ms=1_000)  # 333.33… ms per token
    assert [run(store, check, clock).ok for _ in range(4)] == [True, True, True, False]


def test_gcra_cost_above_the_bucket_never_fits_and_says_retry_after_a_window() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    assert run(store, Check("k", GCRA, 5, 1_000, cost=6), clock) == Outcome(False, 5, 0, 1_000)


# --- retry is exact -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [FIXED, SLIDING, GCRA])
def test_retry_is_exactly_when_the_same_request_fits_again(algorithm: str) -> None:
    rng = random.Random(algorithm)
    for trial in range(300):
        store, clock = MemoryStore(), FakeClock.at_ms(T0 + rng.randrange(10_000))
        limit = rng.randint(1, 12)
        check = Check(f"k{trial}", algorithm, limit, rng.choice([1_000, 1_500, 7_000]), cost=rng.randint(1, limit))
        for _ in range(rng.randint(0, 20)):
            clock.advance_ms(rng.choice([0, 10, 300]))
            run(store, check, clock)
        probe = store.decide([Check(check.key, algorithm, limit, check.window_ms, check.cost)], clock.now_ms)[0]
        if probe.ok:
            continue
        # A probe that does not fit consumed nothing: ask again just before and at retry.
        before = store.decide([check], clock.now_ms + probe.retry_ms - 1)[0]
        at = store.decide([check], clock.now_ms + probe.retry_ms)[0]
        assert not before.ok, (trial, probe)
        assert at.ok, (trial, probe)


# --- groups -------------------------------------------------------------------------------


def test_a_group_refused_by_one_limit_consumes_from_none() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    burst = Check("burst", FIXED, limit=2, window_ms=1_000)
    daily = Check("daily", FIXED, limit=100, window_ms=86_400_000)
    assert [o.ok for o in store.decide([burst, daily], clock.now_ms)] == [True, True]
    assert [o.ok for o in store.decide([burst, daily], clock.now_ms)] == [True, True]
    refused = store.decide([burst, daily], clock.now_ms)
    assert [o.ok for o in refused] == [False, True]
    assert refused[1].remaining == 98  # the daily quota was not charged for the refusal
    assert store.decide([daily], clock.now_ms)[0].remaining == 97


def test_a_shadow_limit_over_its_limit_does_not_refuse_the_group() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    shadow = Check("shadow", FIXED, limit=1, window_ms=1_000, shadow=True)
    real = Check("real", FIXED, limit=10, window_ms=1_000)
    store.decide([shadow, real], clock.now_ms)
    over = store.decide([shadow, real], clock.now_ms)
    assert [o.ok for o in over] == [False, True]
    assert over[1].remaining == 8  # the request was admitted and counted on the real limit


def test_state_keys_name_the_window() -> None:
    check = Check("sg:rl:{c:a}:r:f1000", FIXED, 1, 1_000)
    assert algorithms.state_keys(check, T0 + 5) == (f"sg:rl:{{c:a}}:r:f1000:{T0}",)
    sliding = Check("s", SLIDING, 1, 1_000)
    assert algorithms.state_keys(sliding, T0 + 5) == (f"s:{T0}", f"s:{T0 - 1_000}")
    assert algorithms.state_keys(Check("g", GCRA, 1, 1_000), T0) == ("g",)


def test_memory_store_sweeps_expired_state_and_caps_its_size() -> None:
    store = MemoryStore(max_keys=50)
    store.SWEEP_EVERY = 10  # type: ignore[misc]
    for i in range(200):
        store.decide([Check(f"k{i}", FIXED, 5, 1_000)], T0)
    assert len(store) <= 50
    store.sweep(T0 + 10_000)  # every window ended long ago
    assert len(store) == 0


# --- leases -------------------------------------------------------------------------------


def test_a_lease_takes_an_eighth_of_what_is_left_up_to_the_reserve_and_nothing_near_the_limit() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    check = Check("k", FIXED, 100, 60_000, reserve=10)
    first = run(store, check, clock)
    assert first == Outcome(True, 89, 60_000, 0, leased=10)  # 1 used + 10 held, counted in the store
    store._data["k:" + str(T0)] = (85.0, T0 + 61_000)  # other replicas counted up to 85
    taken = []
    while (outcome := run(store, check, clock)).ok:
        taken.append((outcome.leased, outcome.remaining))
    # 14, 12, 10, 8 left after the request: a lease of 1 each; under 8 left: the last units one by one
    assert taken == [(1, 13), (1, 11), (1, 9), (1, 7), (0, 6), (0, 5), (0, 4), (0, 3), (0, 2), (0, 1), (0, 0)]
    assert store._data["k:" + str(T0)][0] == 100  # never past the limit


def test_a_sliding_window_lease_counts_in_the_current_window() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    check = Check("s", SLIDING, 1_000, 60_000, reserve=50)
    assert run(store, check, clock) == Outcome(True, 949, 60_000, 0, leased=50)
    clock.advance_ms(60_000)  # the next window: 51 of the previous still weigh in fully at its start
    assert run(store, check, clock) == Outcome(True, 898, 60_000, 0, leased=50)


def test_refused_groups_and_gcra_lease_nothing() -> None:
    store, clock = MemoryStore(), FakeClock.at_ms(T0)
    burst = Check("b", FIXED, 1, 1_000, reserve=10)
    daily = Check("d", FIXED, 1_000, 86_400_000, reserve=10)
    assert [o.leased for o in store.decide([burst, daily], clock.now_ms)] == [0, 10]
    day_left = 86_400_000 - T0 % 86_400_000
    refused = [Outcome(False, 0, 1_000, 1_000), Outcome(True, 989, day_left, 0)]
    assert store.decide([burst, daily], clock.now_ms) == refused  # the burst refuses: nothing taken
    assert run(store, Check("g", GCRA, 1_000, 1_000, reserve=10), clock).leased == 0
