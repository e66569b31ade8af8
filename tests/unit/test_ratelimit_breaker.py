"""The Redis circuit breaker: it opens on a store that keeps failing, not on one pause of the
event loop, and closes within its cap of the store answering again."""

from __future__ import annotations

from ratelimit.store import CircuitBreaker
from tests.conftest import FakeClock


def test_failures_in_a_row_open_it() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(clock)
    opened = []
    for _ in range(3):
        sent = clock()
        clock.advance(0.05)  # each call sent after the last failure, and timed out
        opened.append(breaker.failure(sent))
    assert opened == [False, False, True]
    assert breaker.rejecting()


def test_one_pause_that_fails_every_call_in_flight_is_one_failure() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(clock)
    sent = [clock() + i * 0.001 for i in range(4)]  # four batches in flight
    clock.advance(0.2)  # the loop stalls past their timeout: all four fail at once
    assert [breaker.failure(at) for at in sent] == [False] * 4
    assert breaker.state == CircuitBreaker.CLOSED
    assert breaker.success() is False  # the next batch succeeds: the count starts again
    assert breaker.failures == 0


def test_a_success_between_failures_resets_the_count() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(clock)
    for _ in range(10):
        for _ in range(2):
            sent = clock()
            clock.advance(0.05)
            breaker.failure(sent)
        breaker.success()
    assert breaker.state == CircuitBreaker.CLOSED


def test_probes_back_off_to_the_cap_so_it_closes_within_it() -> None:
    clock = FakeClock(100.0)
    breaker = CircuitBreaker(clock)
    breaker.failure(sustained=True)
    cooldowns = []
    for _ in range(8):
        clock.now = breaker.retry_at
        assert breaker.allow()  # the probe
        breaker.failure(clock())
        cooldowns.append(round(breaker.retry_at - clock(), 3))
    assert cooldowns == [0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    clock.now = breaker.retry_at  # Redis answers again: the next probe closes it
    assert breaker.allow()
    assert breaker.success() is True
    assert not breaker.rejecting()
