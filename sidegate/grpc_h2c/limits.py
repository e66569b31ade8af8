"""Every bound the gRPC server puts on a peer, in one place.

Each limit is a named constant, and ``Limits`` gathers them so that a server (or a test) can
change one. The defaults follow what nghttp2, Go's ``x/net/http2`` and Envoy's own HTTP/2 codec
do for the same resource, sized for Envoy as the only intended client. The README's security
section lists them with what each one stops. ``sidegate/settings.py`` exposes the few an
operator may tune (connections per worker, the idle timeout, the connection age).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# -- what we advertise in SETTINGS, and enforce ---------------------------------------------
MAX_CONCURRENT_STREAMS = 100  # open streams per connection; more are refused (REFUSED_STREAM)
MAX_HEADER_LIST_SIZE = 16 << 10  # decoded header bytes per request (RFC 7541 §4.1 sizes); more: 431
MAX_MESSAGE = 4 << 20  # one gRPC message, as grpcio's default receive limit; more: RESOURCE_EXHAUSTED
# A stream's receive window: one largest message and its 5-byte prefix fit, so a unary call never
# waits for credit that only its handler (which has not started) could give back.
STREAM_WINDOW = MAX_MESSAGE + (64 << 10)
# The connection's receive window. Credit comes back only as handlers take their messages, so
# this is also the most request bytes one connection can make the worker hold.
CONNECTION_WINDOW = 2 * STREAM_WINDOW

# -- what we hold --------------------------------------------------------------------------
MAX_HEADER_BLOCK = 2 * MAX_HEADER_LIST_SIZE  # compressed HEADERS + CONTINUATION bytes of one block
MAX_DECODED_HEADERS = 2 * MAX_HEADER_LIST_SIZE  # past this, decoding stops and the connection ends
WORKER_BUFFER = 64 << 20  # request bytes (messages and header lists) all connections of a worker hold
FAIR_SHARE = 1 << 20  # over WORKER_BUFFER, a connection holding more than this is paused or refused
MAX_CONNECTIONS = 256  # per worker; the next connection is closed at once with a GOAWAY
CACHED_BLOCK = 1024  # longer header blocks are decoded each time, not remembered
CACHED_HEADERS = 2048  # decoded header bytes a remembered block may stand for
CACHE_ENTRIES = 64  # remembered blocks per connection
RECENTLY_RESET = 2 * MAX_CONCURRENT_STREAMS  # streams we reset, remembered to ignore frames in flight
MAX_DETAILS = 1024  # characters of a grpc-message: a trailer block always fits one frame

# -- time (seconds) ------------------------------------------------------------------------
TICK = 1.0  # how often every connection's clocks are checked
PREFACE_TIMEOUT = 10.0  # from accept to the client's preface and first SETTINGS frame
IDLE_TIMEOUT = 300.0  # a connection with no stream and no frame this long is closed (GOAWAY NO_ERROR)
STREAM_IDLE_TIMEOUT = 120.0  # a stream waiting for request bytes that do not come is reset (CANCEL)
FLOW_BLOCKED_TIMEOUT = 60.0  # a stream whose answer waits for window this long is reset (CANCEL)
MAX_CONNECTION_AGE = 3600.0  # then a graceful GOAWAY, so long-lived connections move between workers
MAX_CONNECTION_AGE_GRACE = 60.0  # after that GOAWAY, calls still running are cancelled
GOAWAY_NOTICE = 0.5  # between "no new streams soon" and the GOAWAY naming the last stream served

# -- abuse: counters that end a connection with GOAWAY ENHANCE_YOUR_CALM ----------------------
# Counts decay by half every TICK, so a steady rate of about half the limit per second is allowed.
MAX_CONTROL_FRAMES = 1000  # PING, SETTINGS, PRIORITY, WINDOW_UPDATE, RST_STREAM, unknown types
CONTROL_PER_USEFUL = 2  # and this many more per stream opened or DATA frame sent
MAX_EMPTY_FRAMES = 8  # consecutive DATA or CONTINUATION frames that carry nothing and end nothing
MAX_REFUSED_STREAMS = 100  # streams opened past MAX_CONCURRENT_STREAMS
# Rapid Reset (CVE-2023-44487), as Envoy counts it: once this many streams were opened, more
# than half of them reset by the client before their answer ended.
PREMATURE_RESET_MIN_STREAMS = 100


@dataclass(frozen=True)
class Limits:
    """The limits one server applies; every field defaults to the constant of the same name."""

    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    max_header_list_size: int = MAX_HEADER_LIST_SIZE
    max_message: int = MAX_MESSAGE
    stream_window: int = STREAM_WINDOW
    connection_window: int = CONNECTION_WINDOW
    max_header_block: int = MAX_HEADER_BLOCK
    worker_buffer: int = WORKER_BUFFER
    fair_share: int = FAIR_SHARE
    max_connections: int = MAX_CONNECTIONS
    tick: float = TICK
    preface_timeout: float = PREFACE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    stream_idle_timeout: float = STREAM_IDLE_TIMEOUT
    flow_blocked_timeout: float = FLOW_BLOCKED_TIMEOUT
    max_connection_age: float = MAX_CONNECTION_AGE
    max_connection_age_grace: float = MAX_CONNECTION_AGE_GRACE
    max_control_frames: int = MAX_CONTROL_FRAMES
    max_empty_frames: int = MAX_EMPTY_FRAMES
    max_refused_streams: int = MAX_REFUSED_STREAMS
    premature_reset_min_streams: int = PREMATURE_RESET_MIN_STREAMS


class Budget:
    """Request bytes held by every connection of one worker, against ``Limits.worker_buffer``.

    Connections add what they buffer and take back what handlers consume. A connection that
    finds the worker over budget pauses its own reading (when it holds more than its fair share)
    and asks to be woken when the total is back under half."""

    __slots__ = ("held", "limit", "sleepers")

    def __init__(self, limit: int) -> None:
        self.held = 0
        self.limit = limit
        self.sleepers: dict[int, Callable[[], None]] = {}  # id of a paused connection -> its wake-up

    def release(self, size: int) -> None:
        """Take ``size`` bytes back; wake the paused connections once under half the limit."""
        self.held -= size
        if self.sleepers and self.held <= self.limit // 2:
            sleepers, self.sleepers = self.sleepers, {}
            for wake in sleepers.values():
                wake()
