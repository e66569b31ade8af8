"""A seeded frame fuzzer against a ``grpc_h2c`` server in its own process (the attack suite's).

Each round opens a connection and sends a random mix of frames: whole valid calls, frames of
every type with random flags, stream ids, lengths and payloads, valid frames with bytes flipped,
header blocks from a real encoder cut short or corrupted. The server must never raise into its
event loop nor log an error of its own, must stay under its memory bound, and must keep
answering a second client's health checks. It runs ``FUZZ_SECONDS`` (25 by default; ``make
fuzz`` runs it longer) with the seed printed, so a failure can be replayed with
``SIDEGATE_FUZZ_SEED``."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable

from sidegate.grpc_h2c import frames
from tests.integration.h2_attacks import RSS_BOUND, Server, Watch
from tests.integration.test_h2_attacks import server
from tests.unit.h2_factory import Client, message, request_headers

__all__ = ("server",)  # the fixture, shared with the attack suite

FUZZ_SECONDS = float(os.environ.get("SIDEGATE_FUZZ_SECONDS", "25"))
SEED = int(os.environ.get("SIDEGATE_FUZZ_SEED", str(random.SystemRandom().randrange(1 << 32))))
PATHS = ("/t.T/Echo", "/t.T/Hold", "/grpc.health.v1.Health/Check", "/nope", "")


def random_frame(rng: random.Random, client: Client, fresh: Callable[[], int] | None = None) -> bytes:
    """One frame (or a few) of a random kind; ``fresh`` gives new stream ids in order, when set."""
    new = fresh or (lambda: rng.randrange(1, 1 << 20, 2))
    stream = rng.choice((0, 1, 2, 3, 5, rng.randrange(1, 200, 2), rng.randrange(1 << 31), new()))
    choice = rng.randrange(10)
    if choice == 0:  # a whole valid call, on a fresh odd stream
        return client.call(new(), rng.randbytes(rng.randrange(50)))
    if choice == 1:  # request headers, maybe odd ones
        fields = request_headers(rng.choice(PATHS))
        if rng.random() < 0.3:
            name = rng.choice(("X-Up", "te", "connection", ":path", "grpc-timeout", "x-a"))
            fields.append((name, "v\r"[: rng.randrange(3)]))
        block = client.block(fields)
        if rng.random() < 0.3:
            block = block[: rng.randrange(len(block) + 1)]
        return frames.frame(frames.HEADERS, rng.choice((4, 5, 0, 0x24, 0x2D)), stream, block)
    if choice == 2:
        return frames.frame(frames.DATA, rng.randrange(16), stream, message(rng.randbytes(rng.randrange(40))))
    if choice == 3:  # any type, any flags, any payload
        return frames.frame(rng.randrange(14), rng.randrange(256), stream, rng.randbytes(rng.randrange(20)))
    if choice == 4:
        key = rng.choice((1, 2, 3, 4, 5, 6, 9))
        return frames.settings((key, rng.choice((0, 1, 2, 16_384, 65_535, 1 << 24, 2**31 - 1, 2**32 - 1))))
    if choice == 5:
        return frames.window_update(stream, rng.choice((0, 1, 65_535, 2**31 - 1)))
    if choice == 6:
        return frames.rst_stream(stream, rng.randrange(14))
    if choice == 7:
        return frames.frame(frames.CONTINUATION, rng.choice((0, 4)), stream, rng.randbytes(rng.randrange(10)))
    if choice == 8:
        return frames.frame(frames.PRIORITY, 0, stream, struct.pack(">LB", rng.choice((0, stream)), 7))
    flipped = bytearray(client.call(new(), b"flip"))
    for _ in range(rng.randrange(1, 4)):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
    return bytes(flipped)


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def test_random_frames_never_break_the_server(server: Server) -> None:
    print(f"fuzz seed {SEED} for {FUZZ_SECONDS:.0f} s (replay: SIDEGATE_FUZZ_SEED={SEED})")
    rng = random.Random(SEED)
    watch = Watch(server.port, server.process.pid)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + FUZZ_SECONDS
    rounds = frames_sent = 0
    try:
        while time.monotonic() < deadline:
            rounds += 1
            client = Client()
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                reader = threading.Thread(target=drain, args=(sock,), daemon=True)
                reader.start()
                data = [client.preface() if rng.random() < 0.95 else rng.randbytes(30)]
                for _ in range(rng.randrange(1, 60)):
                    data.append(random_frame(rng, client))
                frames_sent += len(data)
                with contextlib.suppress(OSError):
                    sock.sendall(b"".join(data))
                time.sleep(0.005)
            reader.join(5)
    finally:
        watch.stop.set()
        thread.join(15)
    print(f"{rounds} connections, {frames_sent} frames, {watch.answered} health checks answered")
    assert watch.failures == [], watch.failures
    assert watch.answered > 0
    assert watch.peak - server.baseline < RSS_BOUND
