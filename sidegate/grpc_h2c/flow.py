"""Flow control both ways (RFC 9113 §5.2, §6.9), for one connection and its streams.

Receiving: the peer may send what we granted. Credit goes back (WINDOW_UPDATE, in batches) only
as a handler consumes request bytes, or at once for bytes nobody will read (padding, a stream
already answered or closed). So what a peer can make us hold is bounded by the windows: a
stream's by ``Limits.stream_window``, a connection's by ``Limits.connection_window``, and every
connection of the worker together by the ``Budget``.

Sending: an answer's DATA and trailers wait in the stream's ``pending`` list while a window is
shut. A stream shut out by the connection window waits in one queue; a WINDOW_UPDATE on the
connection walks that queue only while window remains, so a resume costs in proportion to what
it sends, never a walk over every blocked stream. A stream shut out by its own window waits for
its own WINDOW_UPDATE (or a larger SETTINGS_INITIAL_WINDOW_SIZE).
"""

from __future__ import annotations

import collections
from typing import Any

from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.frames import DATA, END_HEADERS, END_STREAM, HEADERS
from sidegate.grpc_h2c.limits import Budget, Limits
from sidegate.grpc_h2c.streams import CLOSED, HALF_CLOSED_LOCAL, HALF_CLOSED_REMOTE, OPEN, SEND_END_STREAM, Stream


class FlowControl:
    """The window bookkeeping of ``connection.Connection`` (which it is a base of)."""

    limits: Limits
    budget: Budget
    streams: dict[int, Any]
    out: list[bytes]
    now: float
    useful: int

    def __init__(self) -> None:
        self.send_window = frames.DEFAULT_WINDOW  # what we may still send on the connection
        self.peer_window = frames.DEFAULT_WINDOW  # the peer's initial window for each stream
        self.peer_frame = frames.MAX_FRAME  # the largest frame the peer takes
        self.recv_window = frames.DEFAULT_WINDOW  # what the peer may still send on the connection
        self.credit = 0  # consumed bytes not yet given back on the connection
        self.held = 0  # request bytes this connection holds for handlers
        self.waiting: collections.deque[Stream] = collections.deque()  # shut out by the connection window

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def ended(self, stream: Stream) -> None:
        raise NotImplementedError

    # -- receiving ------------------------------------------------------------------------

    def consume(self, stream: Stream, size: int) -> None:
        """A handler took ``size`` request bytes of ``stream``: the peer may send as much again."""
        state = stream.state
        if state == CLOSED:  # its bytes were given back when it closed
            return
        stream.held -= size
        self.held -= size
        budget = self.budget
        budget.held -= size
        if budget.sleepers:
            budget.release(0)
        self.credit += size
        if self.credit >= self.limits.connection_window >> 2:
            self.give_back(0)
        if state != HALF_CLOSED_REMOTE:
            stream.credit += size
            if stream.credit >= self.limits.stream_window >> 1:
                self.write(frames.window_update(stream.id, stream.credit))
                stream.recv_window += stream.credit
                stream.credit = 0

    def give_back(self, size: int) -> None:
        """Connection-level credit, sent once a quarter of the window is owed."""
        self.credit += size
        if self.credit >= self.limits.connection_window >> 2:
            self.write(frames.window_update(0, self.credit))
            self.recv_window += self.credit
            self.credit = 0

    def release(self, stream: Stream) -> None:
        """A stream closed: whatever it held is given back to the connection and the budget."""
        held = stream.held
        budget = self.budget
        budget.held -= stream.weight + held
        stream.weight = 0
        if held:
            stream.held = 0
            self.held -= held
            self.give_back(held)
        if budget.sleepers:
            budget.release(0)
        if stream.buffer is not None:
            stream.buffer = None
        if stream.pending:
            stream.pending = None

    # -- sending --------------------------------------------------------------------------

    def send_data(self, stream: Stream, payload: bytes) -> None:
        """A response message (already framed for gRPC), behind the response headers."""
        if stream.state == CLOSED:
            return
        if not stream.headers_sent:
            stream.headers_sent = True
            self.write(frames.frame(HEADERS, END_HEADERS, stream.id, frames.RESPONSE_HEADERS))
        if stream.pending is None:
            stream.pending = [(payload, False)]
        else:
            stream.pending.append((payload, False))
        self.drain(stream)

    def send_trailers(self, stream: Stream, block: bytes) -> None:
        """The answer's end: trailers (or, with no headers sent yet, a trailers-only answer)."""
        if stream.state == CLOSED:
            return
        stream.local_done = True
        if not stream.headers_sent:
            stream.headers_sent = True
            payload = frames.RESPONSE_HEADERS + block
            self.write(frames.frame(HEADERS, END_HEADERS | END_STREAM, stream.id, payload))
            stream.transition(SEND_END_STREAM)
            self.ended(stream)
            return
        if stream.pending is None:
            stream.pending = [(block, True)]
        else:
            stream.pending.append((block, True))
        self.drain(stream)

    def send_answer(self, stream: Stream, data: bytes) -> None:
        """Headers, one message and OK trailers: one write when the windows let it all out now."""
        size = len(data)
        if stream.state == CLOSED:
            return
        if (
            stream.headers_sent
            or stream.pending
            or size > self.send_window
            or size > stream.send_window
            or size > self.peer_frame
        ):
            self.send_data(stream, data)
            self.send_trailers(stream, frames.OK_TRAILERS)
            return
        stream.headers_sent = stream.local_done = True
        self.send_window -= size
        stream.send_window -= size
        self.useful += 1
        sid = stream.id
        self.write(
            frames.frame(HEADERS, END_HEADERS, sid, frames.RESPONSE_HEADERS)
            + frames.frame(DATA, 0, sid, data)
            + frames.frame(HEADERS, END_HEADERS | END_STREAM, sid, frames.OK_TRAILERS)
        )
        # SEND_END_STREAM, inline on the path of every unary call (see streams._NEXT)
        if stream.state == HALF_CLOSED_REMOTE:
            stream.state = CLOSED
        elif stream.state == OPEN:
            stream.state = HALF_CLOSED_LOCAL
        else:
            stream.transition(SEND_END_STREAM)
        self.ended(stream)

    def drain(self, stream: Stream) -> None:
        """Send what the windows allow of the stream's pending frames; hold the rest."""
        pending = stream.pending
        while pending:
            payload, is_trailers = pending[0]
            if is_trailers:
                pending.pop(0)
                self.write(frames.frame(HEADERS, END_HEADERS | END_STREAM, stream.id, payload))
                stream.blocked_since = -1.0
                stream.transition(SEND_END_STREAM)
                self.ended(stream)
                return
            room = min(self.send_window, stream.send_window, self.peer_frame)
            if room <= 0:
                if stream.blocked_since < 0:
                    stream.blocked_since = self.now
                if self.send_window <= 0 and not stream.queued:
                    stream.queued = True
                    self.waiting.append(stream)
                return
            chunk, rest = payload[:room], payload[room:]
            self.write(frames.frame(DATA, 0, stream.id, chunk))
            self.useful += 1
            size = len(chunk)
            self.send_window -= size
            stream.send_window -= size
            if rest:
                pending[0] = (rest, False)
            else:
                pending.pop(0)
        stream.blocked_since = -1.0

    def resume(self) -> None:
        """The connection window opened: serve the streams that waited for it, in order, while
        it stays open. A stream still shut by its own window leaves the queue until that opens."""
        waiting = self.waiting
        while waiting and self.send_window > 0:
            stream = waiting.popleft()
            stream.queued = False
            if stream.state != CLOSED and stream.pending:
                self.drain(stream)

    def stream_window_opened(self, stream: Stream, delta: int) -> bool:
        """Add ``delta`` to a stream's send window; False when that passes 2^31-1 (RFC 9113 §6.9.1)."""
        stream.send_window += delta
        if stream.send_window > frames.MAX_WINDOW:
            return False
        if delta > 0 and stream.pending and stream.send_window > 0 and not stream.queued:
            self.drain(stream)
        return True
