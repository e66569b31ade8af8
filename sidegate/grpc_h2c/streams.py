"""One HTTP/2 stream as the server sees it: its state (RFC 9113 §5.1), its two flow-control
windows, the request bytes it holds, and the gRPC messages (length-prefixed) cut out of them.

States and transitions, for a server (no PUSH_PROMISE, so no reserved states)::

    IDLE --recv HEADERS--> OPEN --recv END_STREAM--> HALF_CLOSED_REMOTE --send END_STREAM--> CLOSED
                           OPEN --send END_STREAM--> HALF_CLOSED_LOCAL  --recv END_STREAM--> CLOSED
    any state but IDLE --send or recv RST_STREAM--> CLOSED

What each state accepts from the peer is checked by the connection (``connection.py``); a
transition the table does not list raises ``InvalidTransition`` (a bug of ours, not the peer's).
"""

from __future__ import annotations

from typing import Any

from sidegate.grpc_h2c.frames import MESSAGE

IDLE, OPEN, HALF_CLOSED_REMOTE, HALF_CLOSED_LOCAL, CLOSED = range(5)
STATE_NAMES = ("idle", "open", "half-closed (remote)", "half-closed (local)", "closed")
RECV_HEADERS, RECV_END_STREAM, SEND_END_STREAM, RECV_RST_STREAM, SEND_RST_STREAM = range(5)

_ = -1  # no such transition
# _NEXT[state][event]: the state after the event.
_NEXT = (
    (OPEN, _, _, _, _),  # IDLE
    (_, HALF_CLOSED_REMOTE, HALF_CLOSED_LOCAL, CLOSED, CLOSED),  # OPEN
    (_, _, CLOSED, CLOSED, CLOSED),  # HALF_CLOSED_REMOTE
    (_, CLOSED, _, CLOSED, CLOSED),  # HALF_CLOSED_LOCAL
    (_, _, _, _, _),  # CLOSED
)

# gRPC status codes the core answers with itself (the calls layer maps them to grpc.StatusCode).
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 8, 12, 13


class InvalidTransition(Exception):  # noqa: N818 - names the event that the state does not allow
    pass


class BadMessage(Exception):  # noqa: N818 - a request message gRPC refuses: answered with ``code``
    def __init__(self, code: int, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Stream:
    """A stream's protocol state. The calls layer subclasses it (one object per call)."""

    __slots__ = (
        "blocked_since",
        "buffer",
        "conn",
        "content_length",
        "credit",
        "headers_sent",
        "held",
        "id",
        "local_done",
        "pending",
        "progress",
        "queued",
        "recv_window",
        "send_window",
        "state",
        "weight",
    )

    def __init__(self, conn: Any, stream_id: int) -> None:
        # Made by the connection when the stream's HEADERS arrive: born OPEN (IDLE --recv HEADERS-->).
        # ``calls.Call`` sets the same fields in its own __init__ (one call less per call).
        self.conn = conn
        self.id = stream_id
        self.state = OPEN
        self.send_window = 0  # what we may still send on it (set by the connection)
        self.recv_window = 0  # what the peer may still send on it
        self.credit = 0  # consumed bytes not yet given back with a WINDOW_UPDATE
        self.held = 0  # received bytes not yet consumed by a handler (nor given back)
        self.weight = 0  # decoded header bytes, counted against the worker's budget while open
        self.buffer: bytearray | None = None  # the start of a message not yet whole
        self.pending: list[tuple[bytes, bool]] | None = None  # (DATA payload or trailers, is_trailers)
        self.queued = False  # waiting in the connection's queue for connection window
        self.headers_sent = False
        self.local_done = False  # the answer's end (trailers or a reset) is sent or queued
        self.progress = 0.0  # coarse time of the last request bytes
        self.blocked_since = -1.0  # coarse time its answer first waited for window (-1: not waiting)
        self.content_length = -1  # request bytes still expected when content-length was given

    def transition(self, event: int) -> None:
        state = _NEXT[self.state][event]
        if state < 0:
            raise InvalidTransition(f"stream {self.id}: event {event} in state {STATE_NAMES[self.state]}")
        self.state = state

    @property
    def remote_open(self) -> bool:
        """The peer may still send request bytes on it."""
        return self.state in (OPEN, HALF_CLOSED_LOCAL)

    def feed(self, payload: bytes, max_message: int) -> list[bytes]:
        """The whole gRPC messages that ``payload`` completes; the rest waits in ``buffer``.

        Raises ``BadMessage`` for a compressed message (we accept no grpc-encoding, so the flag
        cannot be set) or one over ``max_message``, as soon as its prefix is read."""
        buffer = self.buffer
        data: bytes | bytearray = payload
        if buffer is not None:
            buffer += payload
            data = buffer
        size = len(data)
        offset = 0
        messages: list[bytes] = []
        while size - offset >= 5:
            flag, length = MESSAGE.unpack_from(data, offset)
            if flag:
                raise BadMessage(INTERNAL, "compressed flag set without grpc-encoding")
            if length > max_message:
                raise BadMessage(RESOURCE_EXHAUSTED, f"message larger than {max_message} bytes")
            end = offset + 5 + length
            if end > size:
                break
            messages.append(bytes(data[offset + 5 : end]))
            offset = end
        if offset == size:
            self.buffer = None
        elif buffer is None:
            self.buffer = bytearray(data[offset:])
        else:
            del buffer[:offset]
        return messages
