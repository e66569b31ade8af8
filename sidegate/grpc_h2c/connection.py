"""One HTTP/2 connection, sans I/O: bytes in, calls on a ``Listener`` and bytes out.

``Connection.receive`` takes what the socket read; it parses frames, enforces RFC 9113 (frame
rules, §5.1 stream states, §8 headers through ``headers.py``), the gRPC framing of request
messages and every limit in ``limits.py``, and tells its ``Listener`` what happened: a request
(``request``), its messages and end (``data``), a message refused (``fail``), a stream gone
(``reset``). The answers come back through ``send_answer``, ``send_data``, ``send_trailers`` and
``reset_stream`` (``flow.py``). Every byte to send is appended to ``out``; ``notify`` (when set)
is called when ``out`` was empty, so the I/O layer can schedule one write. ``tick`` is the only
clock: the I/O layer calls it every ``Limits.tick`` seconds with the time, and every timeout and
abuse counter is checked there.

Events are calls on the listener rather than a list of event objects because this sits on the
path of every sidecar call; tests record them (``tests/unit/h2_factory.py``).

A connection error writes GOAWAY and sets ``terminated``; the I/O layer then closes. A graceful
end (ours or the peer's GOAWAY) sets ``closing``; once no stream is left, ``finished`` is true.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.flow import FlowControl
from sidegate.grpc_h2c.frames import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADER,
    HEADERS,
    MAX_FRAME,
    MAX_WINDOW,
    NO_ERROR,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    SETTINGS_MAX_HEADER_LIST_SIZE,
    SETTINGS_TIMEOUT,
    STREAM_CLOSED,
    WINDOW_UPDATE,
)
from sidegate.grpc_h2c.headers import CompressionError, HeaderDecoder, Malformed, RequestHead
from sidegate.grpc_h2c.limits import GOAWAY_NOTICE, Budget, Limits
from sidegate.grpc_h2c.streams import (
    CLOSED,
    HALF_CLOSED_REMOTE,
    OPEN,
    RECV_END_STREAM,
    RECV_RST_STREAM,
    SEND_RST_STREAM,
    BadMessage,
    Stream,
)

_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
PREFACE_PHASE, SETTINGS_PHASE, FRAMES_PHASE = range(3)  # what the connection waits for first
_PLAIN = END_HEADERS | PADDED | PRIORITY_FLAG  # a HEADERS frame with only END_HEADERS of these


class ProtocolError(Exception):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with ``code``, then the connection closes."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Listener(Protocol):
    """What the connection tells the calls layer."""

    def request(self, stream: Any, head: RequestHead, end_stream: bool) -> None:
        """A new stream with well-formed gRPC request headers."""

    def data(self, stream: Any, messages: list[bytes], end_stream: bool) -> int:
        """Whole request messages (maybe none) and whether the client has finished sending.

        Returns the bytes (each message with its 5-byte prefix) taken at once; the rest are
        held until ``Connection.consume`` is called for them."""
        return 0

    def fail(self, stream: Any, code: int, details: str) -> None:
        """A request message gRPC refuses: answer ``code`` (a gRPC status number)."""

    def reset(self, stream: Any) -> None:
        """The stream is gone (reset by the peer, by a stream error, a timeout, the connection's
        end): stop its call and send nothing more on it."""


class Connection(FlowControl):
    """See the module doc. ``stream_class`` makes each stream's object (the calls layer's)."""

    def __init__(
        self, listener: Listener, limits: Limits, budget: Budget, now: float, stream_class: type[Stream] = Stream
    ) -> None:
        super().__init__()
        self.listener = listener
        self.limits = limits
        self.budget = budget
        self.stream_class = stream_class
        self.decoder = HeaderDecoder(limits.max_header_list_size)
        self.streams: dict[int, Any] = {}
        self.recently_reset: dict[int, None] = {}  # streams we reset: frames in flight are ignored
        self.last_stream = 0
        self.phase = PREFACE_PHASE
        self.inbox = bytearray()
        self.out: list[bytes] = []
        self.notify: Callable[[], None] | None = None
        self.headers_for: tuple[int, int, bytearray, bool] | None = None  # a block awaiting CONTINUATION
        self.going_away = False  # our GOAWAY notice is out: no new streams soon
        self.final_sent = False  # our last GOAWAY is out
        self.reason = ""  # why we ended the connection, for the log
        self.closing = False  # no new streams: the connection ends once its streams do
        self.terminated: int | None = None  # the error code of a connection error we sent
        self.peer = ""
        self.now = self.created = self.last_active = now
        self.goaway_at = 0.0  # when the final GOAWAY of an aging connection is due
        # abuse counters (decay by half every tick)
        self.control = self.useful = self.empty = self.refused = 0
        self.opened = self.premature = 0  # for the life of the connection, as Envoy counts them
        self.recv_window = limits.connection_window

    def initiate(self) -> None:
        """Our preface: SETTINGS and the connection window beyond the default."""
        limits = self.limits
        self.write(
            frames.settings(
                (SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window),
                (SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
                (SETTINGS_ENABLE_PUSH, 0),
            )
            + frames.window_update(0, limits.connection_window - frames.DEFAULT_WINDOW)
        )

    def write(self, data: bytes) -> None:
        out = self.out
        out.append(data)
        if len(out) == 1 and self.notify is not None:
            self.notify()

    @property
    def finished(self) -> bool:
        """Closing, and no stream left: time to end the connection."""
        return self.closing and not self.streams

    # -- bytes in --------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Take bytes the peer sent. Never raises for anything the peer does."""
        if self.terminated is not None:
            return
        inbox = self.inbox
        inbox += data
        self.last_active = self.now
        if self.phase == PREFACE_PHASE:
            if inbox[: len(PREFACE)] != PREFACE[: len(inbox)]:
                self.terminate(PROTOCOL_ERROR, "not HTTP/2 with prior knowledge")  # say so at once
                return
            if len(inbox) < len(PREFACE):
                return
            del inbox[: len(PREFACE)]
            self.phase = SETTINGS_PHASE
        offset = 0
        size = len(inbox)
        view = memoryview(inbox)
        try:
            while size - offset >= 9 and self.terminated is None:
                high, low, kind, flags, stream = HEADER.unpack_from(inbox, offset)
                length = high << 8 | low
                if length > MAX_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, "a frame over SETTINGS_MAX_FRAME_SIZE")
                end = offset + 9 + length
                if end > size:
                    break
                payload = bytes(view[offset + 9 : end])
                offset = end
                stream &= 0x7FFFFFFF
                if self.headers_for is not None and kind != CONTINUATION:
                    raise ProtocolError(PROTOCOL_ERROR, "a frame between HEADERS and its CONTINUATION")
                if kind == DATA:
                    self.on_data(stream, flags, payload)
                elif kind == HEADERS:
                    plain = flags & _PLAIN == END_HEADERS and self.phase == FRAMES_PHASE
                    if plain and stream > self.last_stream and stream & 1:
                        self.on_request(stream, flags, payload, False)  # the common case, checked
                    else:
                        self.on_headers(stream, flags, payload)
                else:
                    self.on_frame(kind, flags, stream, payload)
        except ProtocolError as error:
            view.release()
            self.terminate(error.code, error.reason)
            return
        view.release()
        del inbox[:offset]

    def on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """Every frame but DATA and HEADERS."""
        if kind == CONTINUATION:
            self.on_continuation(stream, flags, payload)
            return
        if self.phase == SETTINGS_PHASE:
            if kind != SETTINGS or flags & ACK:
                raise ProtocolError(PROTOCOL_ERROR, "the first frame after the preface is not SETTINGS")
            self.phase = FRAMES_PHASE
        self.control += 1
        if self.control > self.limits.max_control_frames + 2 * self.useful:
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many control frames")
        if kind == SETTINGS:
            self.on_settings(stream, flags, payload)
        elif kind == WINDOW_UPDATE:
            self.on_window_update(stream, payload)
        elif kind == PING:
            if stream:
                raise ProtocolError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "PING not 8 bytes")
            if not flags & ACK:
                self.write(frames.frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self.on_rst_stream(stream, payload)
        elif kind == PRIORITY:
            if not stream:
                raise ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self.stream_error(stream, FRAME_SIZE_ERROR)
            elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream:
                self.stream_error(stream, PROTOCOL_ERROR)  # §5.3.1: a stream cannot depend on itself
        elif kind == GOAWAY:
            if stream:
                raise ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            self.closing = True  # the peer opens no more streams: end once its calls are answered
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # unknown frame types are ignored, as RFC 9113 §4.1 asks (and counted above)

    def on_settings(self, stream: int, flags: int, payload: bytes) -> None:
        if stream:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        for index in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, index)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta = value - self.peer_window
                self.peer_window = value
                if delta:
                    for each in list(self.streams.values()):
                        if not self.stream_window_opened(each, delta):
                            raise ProtocolError(FLOW_CONTROL_ERROR, "a stream window past 2^31-1")
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value < 1 << 24:
                    raise ProtocolError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH neither 0 nor 1")
            # HEADER_TABLE_SIZE: our answers never use the dynamic table. MAX_CONCURRENT_STREAMS:
            # we open none. MAX_HEADER_LIST_SIZE: our answers' header lists are small. Others: unknown.
        self.write(frames.frame(SETTINGS, ACK, 0))
        self.resume()

    def on_window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream == 0:
            if increment == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window past 2^31-1")
            self.resume()
            return
        found = self.streams.get(stream)
        if found is None:
            if stream > self.last_stream:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return  # closed: it may have been in flight
        if increment == 0:
            self.stream_error(stream, PROTOCOL_ERROR)
        elif not self.stream_window_opened(found, increment):
            self.stream_error(stream, FLOW_CONTROL_ERROR)

    def on_rst_stream(self, stream: int, payload: bytes) -> None:
        if not stream:
            raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        found = self.streams.get(stream)
        if found is None:
            if stream > self.last_stream:
                raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        # Rapid Reset (CVE-2023-44487): count streams the client resets before we started to
        # answer them, the work an attacker makes us do for nothing. A stream we already answer
        # is not counted: Envoy's ext_proc ends every stream it is done with by a reset.
        if not found.headers_sent:
            self.premature += 1
            if self.opened >= self.limits.premature_reset_min_streams and self.premature * 2 > self.opened:
                raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams reset by the client")
        found.transition(RECV_RST_STREAM)
        self.close_stream(found)
        self.listener.reset(found)

    # -- headers ---------------------------------------------------------------------------

    def on_headers(self, stream: int, flags: int, payload: bytes) -> None:
        if self.phase != FRAMES_PHASE:
            raise ProtocolError(PROTOCOL_ERROR, "the first frame after the preface is not SETTINGS")
        if stream == 0 or not stream & 1:
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0 or an even stream")
        if flags & PADDED:
            payload = _unpad(payload)
        depends_on_itself = False
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            depends_on_itself = _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream
            payload = payload[5:]
        if flags & END_HEADERS:
            self.on_block(stream, flags, payload, depends_on_itself)
            return
        if not payload:
            self.count_empty()
        if len(payload) > self.limits.max_header_block:
            raise ProtocolError(PROTOCOL_ERROR, "a header block over its bound")
        self.headers_for = (stream, flags, bytearray(payload), depends_on_itself)

    def on_continuation(self, stream: int, flags: int, payload: bytes) -> None:
        pending = self.headers_for
        if pending is None or pending[0] != stream:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = pending[2]
        if len(block) + len(payload) > self.limits.max_header_block:
            raise ProtocolError(PROTOCOL_ERROR, "a header block over its bound")
        block += payload
        if flags & END_HEADERS:
            self.headers_for = None
            self.on_block(stream, pending[1], bytes(block), pending[3])
        elif payload:
            self.empty = 0
        else:
            self.count_empty()

    def on_block(self, sid: int, flags: int, block: bytes, depends_on_itself: bool) -> None:
        """A whole header block: a new request, or trailers (or a block on a closed stream)."""
        stream = self.streams.get(sid)
        if stream is None and sid > self.last_stream:
            self.on_request(sid, flags, block, depends_on_itself)
            return
        try:
            self.decoder.trailers(block)  # decoded whatever comes next: the table stays in step
        except CompressionError as error:
            raise ProtocolError(error.code, str(error)) from error
        except Malformed:
            if stream is None:  # on a closed stream: answered below
                pass
            else:
                self.stream_error(sid, PROTOCOL_ERROR)
                return
        if stream is None:
            if sid in self.recently_reset:
                return  # sent before our reset reached the peer
            raise ProtocolError(PROTOCOL_ERROR, "HEADERS on a closed stream")
        if stream.state == HALF_CLOSED_REMOTE:
            self.stream_error(sid, STREAM_CLOSED)
        elif not flags & END_STREAM:
            self.stream_error(sid, PROTOCOL_ERROR)  # trailers must end the stream (§8.1)
        else:
            self.end_of_request(stream)

    def on_request(self, sid: int, flags: int, block: bytes, depends_on_itself: bool) -> None:
        """A header block opening stream ``sid`` (above every stream seen so far)."""
        self.last_stream = sid
        try:
            head = self.decoder.request(block)
        except CompressionError as error:
            raise ProtocolError(error.code, str(error)) from error
        except Malformed:
            self.stream_error(sid, PROTOCOL_ERROR)
            return
        if self.closing:
            self.write(frames.rst_stream(sid, REFUSED_STREAM))
            self.remember_reset(sid)
            return
        budget = self.budget
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self.write(frames.rst_stream(sid, REFUSED_STREAM))
            self.remember_reset(sid)
            self.refused += 1  # the peer ignores what we advertised
            if self.refused > self.limits.max_refused_streams:
                raise ProtocolError(ENHANCE_YOUR_CALM, "too many streams past the limit")
            return
        if budget.held > budget.limit and self.held > self.limits.fair_share:
            self.write(frames.rst_stream(sid, REFUSED_STREAM))  # the worker is full: not the peer's fault
            self.remember_reset(sid)
            return
        if depends_on_itself:
            self.stream_error(sid, PROTOCOL_ERROR)
            return
        self.opened += 1
        self.useful += 1
        end_stream = bool(flags & END_STREAM)
        if head.refusal is not None:
            refusal = head.refusal
            answer = frames.trailers(refusal.code, refusal.details)
            headers = frames.RESPONSE_HEADERS if refusal.status == 200 else frames.status_headers(refusal.status)
            self.write(frames.frame(HEADERS, END_HEADERS | END_STREAM, sid, headers + answer))
            if not end_stream:
                self.write(frames.rst_stream(sid, NO_ERROR))
                self.remember_reset(sid)
            return
        stream = self.stream_class(self, sid)  # IDLE --recv HEADERS--> OPEN
        stream.send_window = self.peer_window
        stream.recv_window = self.limits.stream_window
        stream.progress = self.now
        stream.content_length = head.content_length
        stream.weight = head.size
        budget.held += head.size
        self.streams[sid] = stream
        if end_stream:
            if head.content_length > 0:
                self.stream_error(sid, PROTOCOL_ERROR)
                return
            stream.state = HALF_CLOSED_REMOTE  # OPEN --recv END_STREAM-->
        self.listener.request(stream, head, end_stream)

    # -- data ------------------------------------------------------------------------------

    def on_data(self, sid: int, flags: int, payload: bytes) -> None:  # noqa: PLR0915 - one frame's rules, in order
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        if self.phase != FRAMES_PHASE:
            raise ProtocolError(PROTOCOL_ERROR, "the first frame after the preface is not SETTINGS")
        size = len(payload)
        self.recv_window -= size  # every DATA counts against the connection, whatever its stream
        if self.recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA past the connection window")
        if size:
            self.empty = 0
        elif not flags & END_STREAM:
            self.count_empty()
        stream = self.streams.get(sid)
        if stream is None:
            self.give_back(size)  # nobody will read it
            if sid > self.last_stream:
                raise ProtocolError(PROTOCOL_ERROR, "DATA on an idle stream")
            if sid not in self.recently_reset:  # else it crossed our reset: ignored (§5.1)
                self.stream_error(sid, STREAM_CLOSED)
            return
        if stream.state == HALF_CLOSED_REMOTE:
            self.give_back(size)
            self.stream_error(sid, STREAM_CLOSED)  # DATA after END_STREAM
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA past the stream window")
        if flags & PADDED:
            payload = _unpad(payload)
        if stream.content_length >= 0:
            stream.content_length -= len(payload)
            if stream.content_length < 0 or (flags & END_STREAM and stream.content_length):
                self.give_back(size)
                self.stream_error(sid, PROTOCOL_ERROR)  # §8.1.1: DATA and content-length disagree
                return
        kept = len(payload) if not stream.local_done else 0  # answered already: nothing to read
        if kept != size:  # padding, or bytes nobody will read: given back at once
            self.give_back(size - kept)
            if stream.remote_open:
                stream.credit += size - kept
        stream.progress = self.now
        if not kept:
            messages = []
        elif stream.buffer is None and kept >= 5 and payload[0] == 0 and _U32.unpack_from(payload, 1)[0] == kept - 5:
            messages = [payload[5:]]  # one whole message, as most DATA frames of a call hold
        else:
            try:
                messages = stream.feed(payload, self.limits.max_message)
            except BadMessage as bad:
                stream.buffer = None
                self.give_back(kept)
                self.listener.fail(stream, bad.code, bad.details)
                return
        taken = 0
        if flags & END_STREAM:
            if stream.buffer is not None:  # a message cut short
                stream.buffer = None
            # RECV_END_STREAM, inline on the path of every call: OPEN (checked above) or
            # HALF_CLOSED_LOCAL (our answer is out and waits for this: closed, its bytes go back).
            if stream.state == OPEN:
                stream.state = HALF_CLOSED_REMOTE
                taken = self.listener.data(stream, messages, True)
            else:
                stream.transition(RECV_END_STREAM)
                self.close_stream(stream)
        elif messages:
            taken = self.listener.data(stream, messages, False)
        if kept:
            self.hold(stream, kept, taken)

    def hold(self, stream: Stream, kept: int, taken: int) -> None:
        """Count ``kept`` request bytes in, ``taken`` of them (or of bytes held before) out.

        Done after the listener heard of them, so a unary call whose handler took its message at
        once costs no count in and out. A stream closed meanwhile gave back what it held then;
        what it kept from this frame goes back now."""
        if stream.state == CLOSED:
            self.give_back(kept)
            return
        left = kept - taken
        if left:
            stream.held += left
            self.held += left
            self.budget.held += left
        if taken:
            self.give_back(taken)
            if stream.state != HALF_CLOSED_REMOTE:
                stream.credit += taken
                if stream.credit >= self.limits.stream_window >> 1:
                    self.write(frames.window_update(stream.id, stream.credit))
                    stream.recv_window += stream.credit
                    stream.credit = 0

    def end_of_request(self, stream: Stream) -> None:
        """Request trailers: the client has finished sending."""
        stream.transition(RECV_END_STREAM)
        if stream.state == CLOSED:
            self.close_stream(stream)
            return
        self.listener.data(stream, [], True)

    def count_empty(self) -> None:
        self.empty += 1
        if self.empty > self.limits.max_empty_frames:
            raise ProtocolError(ENHANCE_YOUR_CALM, "too many empty frames")

    # -- ends ------------------------------------------------------------------------------

    def ended(self, stream: Stream) -> None:
        """Our answer's END_STREAM is out. If the client is still sending, tell it to stop."""
        if stream.state == CLOSED:
            if self.streams.pop(stream.id, None) is not None:  # close_stream, on every call's path
                self.release(stream)
        else:  # half-closed (local): we need none of the rest
            self.write(frames.rst_stream(stream.id, NO_ERROR))
            stream.transition(SEND_RST_STREAM)
            self.close_stream(stream)
            self.remember_reset(stream.id)

    def reset_stream(self, stream: Stream, code: int) -> None:
        """End a stream of ours with RST_STREAM ``code`` (the calls layer: an error of ours)."""
        if stream.state == CLOSED:
            return
        stream.local_done = True
        self.write(frames.rst_stream(stream.id, code))
        stream.transition(SEND_RST_STREAM)
        self.close_stream(stream)
        self.remember_reset(stream.id)

    def stream_error(self, sid: int, code: int) -> None:
        """RFC 9113 §5.4.2: RST_STREAM ``code``; the stream's call, if any, is stopped."""
        stream = self.streams.get(sid)
        if stream is None:
            self.write(frames.rst_stream(sid, code))
            self.remember_reset(sid)  # frames already in flight on it are ignored
            return
        self.reset_stream(stream, code)
        self.listener.reset(stream)

    def close_stream(self, stream: Stream) -> None:
        """The one place a stream ends: forgotten, and what it held given back."""
        stream.state = CLOSED
        if self.streams.pop(stream.id, None) is not None:
            self.release(stream)

    def remember_reset(self, sid: int) -> None:
        recent = self.recently_reset
        recent[sid] = None
        if len(recent) > self.limits.max_concurrent_streams * 2:
            del recent[next(iter(recent))]

    def goaway(self, *, final: bool) -> None:
        """No new calls on this connection; those under way finish. First a notice (the highest
        stream id, as RFC 9113 §6.8 suggests for a graceful stop: a call the peer sent meanwhile
        is still served), then, ``final``, the last stream served."""
        if self.final_sent:
            return
        if final:
            self.final_sent = self.going_away = self.closing = True
            self.write(frames.goaway(self.last_stream, NO_ERROR))
        elif not self.going_away:
            self.going_away = True
            self.write(frames.goaway(MAX_WINDOW, NO_ERROR))

    def terminate(self, code: int, reason: str) -> None:
        """A connection error: GOAWAY ``code``; every stream is stopped."""
        if self.terminated is not None:
            return
        self.terminated = code
        self.final_sent = self.closing = True
        self.reason = reason
        self.write(frames.goaway(self.last_stream, code))
        self.drop_streams()

    def drop_streams(self) -> None:
        for stream in list(self.streams.values()):
            self.close_stream(stream)
            self.listener.reset(stream)

    # -- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Check every timeout and let the abuse counters decay (see the module doc)."""
        self.now = now
        self.control >>= 1
        self.useful >>= 1
        self.refused >>= 1
        if self.terminated is not None:
            return
        limits = self.limits
        age = now - self.created
        if self.phase != FRAMES_PHASE:
            if age > limits.preface_timeout:
                self.terminate(SETTINGS_TIMEOUT, "no preface and SETTINGS in time")
            return
        if self.streams:
            self.last_active = now  # idle counts from the last stream's end, not from its last frame
        elif now - self.last_active > limits.idle_timeout:
            self.goaway(final=True)
        if age > limits.max_connection_age:
            if not self.going_away:
                self.goaway(final=False)
                self.goaway_at = now + GOAWAY_NOTICE
            elif 0 < self.goaway_at <= now:
                self.goaway(final=True)
            if age > limits.max_connection_age + limits.max_connection_age_grace and self.streams:
                for stream in list(self.streams.values()):
                    self.stream_error(stream.id, CANCEL)
        idle, blocked = limits.stream_idle_timeout, limits.flow_blocked_timeout
        for stream in list(self.streams.values()):
            waiting_for_request = stream.remote_open and now - stream.progress > idle
            if waiting_for_request or (stream.blocked_since >= 0 and now - stream.blocked_since > blocked):
                self.stream_error(stream.id, CANCEL)


def _unpad(payload: bytes) -> bytes:
    """A PADDED frame's content: a pad length, the content, that many bytes of padding."""
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding as long as the frame")
    return payload[1 : len(payload) - payload[0]]
