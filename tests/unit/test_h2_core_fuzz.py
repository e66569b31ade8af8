"""The sans-I/O core under a seeded stream of random frames, with no sockets: ``receive`` never
raises, and the byte accounting holds after every read (what the connection says it holds is
what its streams hold, and the worker's budget is what its connections hold). A short run here;
``tests/integration/test_h2_fuzz.py`` fuzzes a real server for longer."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.limits import Budget, Limits
from tests.integration.test_h2_fuzz import random_frame
from tests.unit.h2_factory import Harness, message, request_headers

SECONDS = float(os.environ.get("SIDEGATE_CORE_FUZZ_SECONDS", "0.5"))
SEED = int(os.environ.get("SIDEGATE_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))


def plausible_frame(rng: random.Random, harness: Harness, fresh: Callable[[], int]) -> bytes:
    """Mostly what a real client sends (so connections live long enough to reach deep states),
    sometimes anything at all."""
    client, open_ids = harness.client, list(harness.conn.streams)
    choice = rng.randrange(12)
    if choice < 3:
        return random_frame(rng, client, fresh)
    if choice < 5:
        return client.call(fresh(), rng.randbytes(rng.randrange(40)))
    if choice == 5:
        return client.headers(fresh(), request_headers(rng.choice(("/t.T/Echo", "/t.T/Chat"))))
    if choice == 6 and open_ids:  # a piece of a message, maybe the end of the request
        piece = message(rng.randbytes(rng.randrange(30)))[: rng.randrange(1, 40)]
        return client.data(rng.choice(open_ids), piece, end_stream=rng.random() < 0.5)
    if choice == 7 and open_ids:
        return frames.rst_stream(rng.choice(open_ids), frames.CANCEL)
    if choice == 8:
        return frames.window_update(rng.choice([0, *open_ids]), rng.randrange(1, 70_000))
    if choice == 9:
        return frames.settings((frames.SETTINGS_INITIAL_WINDOW_SIZE, rng.choice((0, 10, 65_535, 1 << 20))))
    if choice == 10:
        return frames.frame(frames.PING, 0, 0, rng.randbytes(8))
    return client.headers(rng.choice(open_ids or [1]), [("x-t", "1")], end_stream=True)  # trailers


def balanced(harness: Harness) -> bool:
    streams = harness.conn.streams.values()
    return bool(harness.conn.held == sum(s.held for s in streams)) and harness.budget.held == sum(
        s.held + s.weight for s in streams
    )


def test_random_frames_never_raise_and_the_accounting_holds() -> None:
    print(f"core fuzz seed {SEED} (replay: SIDEGATE_FUZZ_SEED={SEED})")
    rng = random.Random(SEED)
    deadline = time.monotonic() + SECONDS
    connections = 0
    while time.monotonic() < deadline:
        connections += 1
        harness = Harness(Limits(), answer=rng.random() < 0.5, budget=Budget(Limits().worker_buffer))
        harness.start()
        fresh = iter(range(1, 1 << 31, 2)).__next__  # new stream ids, in order
        for _ in range(rng.randrange(1, 80)):
            harness.feed(plausible_frame(rng, harness, fresh))
            assert balanced(harness), (SEED, connections)
            if rng.random() < 0.05:
                harness.conn.tick(rng.random() * 1000)
        harness.conn.drop_streams()
        assert harness.budget.held == 0, (SEED, connections)
    assert connections > 10
