"""The attacks of issue 15 (``h2_attacks.py``), each against a fresh ``grpc_h2c`` server in its
own process: while the attack runs, a second client's health checks are all answered, the
server's RSS grows less than ``RSS_BOUND``, and the attacker gets the GOAWAY or RST_STREAM code
that names what it did. The server writes no traceback and nothing reaches its event loop's
exception handler. ``python -m tests.integration.h2_attacks`` prints the README's table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidegate.grpc_h2c.frames import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    SETTINGS_TIMEOUT,
)
from tests.integration.h2_attacks import ATTACKS, RSS_BOUND, Attack, Attacker, Outcome, Server, run


@pytest.fixture
def server() -> Iterator[Server]:
    started = Server.start()
    try:
        yield started
    finally:
        err = started.stop()
        assert "Traceback" not in err, err[-3000:]
        assert "write_eof" not in err, err[-3000:]
        assert "EVENT LOOP EXCEPTION" not in err, err[-3000:]


def check(outcome: Outcome) -> Attacker:
    """Health was answered throughout and memory stayed bounded; the attacker, for its codes."""
    print(outcome.summary())
    assert outcome.watch.failures == [], outcome.watch.failures
    assert outcome.watch.answered > 0
    assert outcome.growth < RSS_BOUND, outcome.growth >> 20
    return outcome.attacker


def by_name(start: str) -> Attack:
    return next(attack for attack in ATTACKS if attack.name.startswith(start))


def test_streams_announcing_large_messages_cannot_buffer_past_the_connection_window(server: Server) -> None:
    attacker = check(run(server, by_name("150 streams")))
    assert attacker.goaway == FLOW_CONTROL_ERROR
    assert attacker.resets.get(201) == REFUSED_STREAM  # the 101st stream


def test_hpack_bombs_end_in_compression_error(server: Server) -> None:
    assert check(run(server, by_name("HPACK"))).goaway == COMPRESSION_ERROR


def test_idle_streams_with_large_header_lists_are_capped_then_refused(server: Server) -> None:
    attacker = check(run(server, by_name("1,000 idle")))
    assert attacker.resets.get(201) == REFUSED_STREAM
    assert attacker.goaway == ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    "name",
    [
        "INITIAL_WINDOW_SIZE=0",
        "Rapid Reset",
        "PING flood",
        "SETTINGS flood",
        "PRIORITY flood",
        "WINDOW_UPDATE flood",
        "empty DATA flood",
        "zero-length CONTINUATION flood",
    ],
)
def test_floods_end_in_enhance_your_calm(server: Server, name: str) -> None:
    assert check(run(server, by_name(name))).goaway == ENHANCE_YOUR_CALM


def test_partial_prefaces_and_too_many_connections_are_closed(server: Server) -> None:
    attacker = check(run(server, by_name("partial prefaces")))
    codes = [each.goaway for each in attacker.crowd]
    assert attacker.goaway == SETTINGS_TIMEOUT
    assert codes.count(ENHANCE_YOUR_CALM) >= 10  # over the cap: closed at once
    assert set(codes) <= {ENHANCE_YOUR_CALM, SETTINGS_TIMEOUT}


def test_an_idle_connection_is_closed_with_a_graceful_goaway(server: Server) -> None:
    assert check(run(server, by_name("an idle connection"))).goaway == NO_ERROR


def test_a_client_goaway_then_frames_close_the_connection_without_an_error(server: Server) -> None:
    attacker = check(run(server, by_name("client GOAWAY")))
    assert attacker.goaway in (None, NO_ERROR)  # and no traceback in the server's stderr (the fixture)
