"""The sidecars' gRPC server: gRPC over cleartext HTTP/2, in one asyncio protocol per connection.

Why not ``grpc.aio``: its server costs ~130-340 µs of CPU per call here before any handler
runs, this one ~9-35 (``bench/grpc_floor.py``): grpc.aio's poller thread hands every
completion to the event loop, three op batches a call, and Envoy calls a sidecar on every
request. This server parses frames where the bytes arrive, runs each call right there until it
waits (``Server.run``: no task for a call answered at once, none for a stream between its
messages), and writes every answer ready in one loop iteration with one syscall.

It speaks what Envoy and gRPC clients send: HTTP/2 with prior knowledge (no TLS: sidecars sit
on loopback or a pod network), HPACK (the ``hpack`` package decodes; a block whose decoding
left the table unchanged, as Envoy's are once its table is warm, is remembered per state of
the table), flow control both ways, PING, SETTINGS, RST_STREAM (cancels the call), GOAWAY
(a graceful stop in two steps), and a GOAWAY naming the error for a peer that breaks HTTP/2.
Calls are unary or streaming in either direction, served by the handlers that ``*_pb2_grpc``
modules register through ``add_generic_rpc_handlers`` / ``add_registered_method_handlers``,
so servicers do not know which server runs them. No compression (Envoy sends none): a compressed
message is answered UNIMPLEMENTED. The key-admin API and tests' helper servers stay on grpcio.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import collections.abc
import contextlib
import contextvars
import functools
import logging
import socket
import struct
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, NamedTuple

import grpc
import hpack

from sidegate import logs

log = logging.getLogger("sidegate.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x2, 0x3, 0x6
STREAM_CLOSED, REFUSED_STREAM, COMPRESSION_ERROR = 0x5, 0x7, 0x9
SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x3, 0x4, 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
MAX_WINDOW = 2**31 - 1

WINDOW = 1 << 24  # what we let a peer send ahead, per stream and per connection
MAX_MESSAGE = 4 << 20  # as grpcio's default receive limit
MAX_HEADER_LIST = 64 << 10
MAX_HEADER_BLOCK = MAX_HEADER_LIST + (16 << 10)  # HEADERS + CONTINUATION bytes before decoding
MAX_DETAILS = 1024  # characters of a grpc-message: a trailer block always fits one frame
CACHED_BLOCK = 1024  # longer header blocks are decoded each time, not remembered
GOAWAY_NOTICE = 0.5  # seconds between "no new streams soon" and the last stream served
MAX_STREAMS = 1000
MAX_FRAME = 16_384  # HTTP/2's default, which we never raise: a peer may send no larger frame
_FRAME = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
_MESSAGE = struct.Struct(">BL")  # gRPC: compressed flag, length


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _FRAME.pack(size >> 8, size & 0xFF, kind, flags, stream) + payload


def _integer(value: int, prefix: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541 §5.1), flags left 0."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing: our answers never touch the table."""
    return b"\x00" + _integer(len(name), 7) + name + _integer(len(value), 7) + value


# :status 200 (static index 8) and content-type (static name 31) = application/grpc
_RESPONSE_HEADERS = b"\x88\x0f\x10" + _integer(16, 7) + b"application/grpc"
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _trailers(code: grpc.StatusCode, details: str) -> bytes:
    block = _literal(b"grpc-status", str(code.value[0]).encode())
    details = details[:MAX_DETAILS]
    if details:
        quoted = urllib.parse.quote(details, safe=" !#$&'()*+,/:;=?@[]~", errors="replace")  # lone surrogates
        block += _literal(b"grpc-message", quoted.encode())
    return block


class HandlerCallDetails(NamedTuple):  # what grpc's generic handlers are asked with
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class _Abort(Exception):  # noqa: N818 - grpc.aio's is AbortError; this one never leaves the module
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Context:
    """The part of ``grpc.aio.ServicerContext`` the sidecars use."""

    __slots__ = ("_call", "code", "details")

    def __init__(self, call: _Call) -> None:
        self._call = call
        self.code = grpc.StatusCode.OK
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.metadata

    def peer(self) -> str:
        return self._call.connection.peer

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def time_remaining(self) -> float | None:
        return None  # Envoy keeps the deadline and resets the stream when it passes

    async def write(self, message: Any) -> None:  # unary-stream handlers that write, as health's Watch
        self._call.send_message(message)

    def cancelled(self) -> bool:
        return self._call.cancelled


class _Call:
    """One HTTP/2 stream = one call."""

    __slots__ = (
        "buffer",
        "cancelled",
        "connection",
        "done",
        "handler",
        "headers_sent",
        "id",
        "metadata",
        "outstanding",
        "pending",
        "queue",
        "received",
        "remote_closed",
        "send_window",
        "task",
        "unacked",
    )

    def __init__(self, connection: _Connection, stream: int, handler: Any, metadata: tuple[Any, ...]) -> None:
        self.connection = connection
        self.id = stream
        self.handler = handler
        self.metadata = metadata
        self.received: list[bytes] = []  # whole messages, for unary requests
        self.buffer = bytearray()  # bytes of a message not yet whole
        self.queue: _Inbox | None = None  # streaming requests
        self.task: asyncio.Task[None] | None = None
        self.send_window = connection.peer_window
        self.pending: list[tuple[bytes, bool]] = []  # (DATA payload or trailer block, is_trailers) held by flow control
        self.headers_sent = False
        self.remote_closed = False
        self.done = False
        self.cancelled = False
        self.unacked = 0  # read, to be given back in the next WINDOW_UPDATE
        self.outstanding = 0  # received and not given back: never more than the window we grant

    def send_message(self, message: Any) -> None:
        if self.done:
            return
        self.connection.send_data(self, self._framed(message))

    def answer(self, message: Any) -> None:
        """A unary call's one response message and its OK trailers."""
        if self.done:
            return
        self.done = True
        self.connection.send_answer(self, self._framed(message))

    def _framed(self, message: Any) -> bytes:
        payload: bytes = self.handler.response_serializer(message) if self.handler.response_serializer else message
        return _MESSAGE.pack(0, len(payload)) + payload

    def finish(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        if self.done:
            return
        self.done = True
        block = _OK_TRAILERS if code is grpc.StatusCode.OK else _trailers(code, details)
        self.connection.send_trailers(self, block)

    def cancel(self) -> None:
        """The stream is gone (reset, or the connection lost): stop the call, send nothing more."""
        self.done = self.cancelled = True
        if self.task is not None:
            self.task.cancel()
            self.connection.server.calls.discard(self.task)  # it may never run to forget itself
        if self.queue is not None and not self.interrupt():
            self.queue.put(None)

    def interrupt(self) -> bool:
        """A parked call (waiting for its next message, no task) is cancelled now: True if it was."""
        if self.queue is None or self.queue.resume is None:
            return False
        resume, self.queue.resume = self.queue.resume, None
        resume(asyncio.CancelledError())
        return True


_PARKED = object()  # what a call's coroutine yields to wait for its next message, task-free


class _Park:
    def __await__(self) -> Any:
        yield _PARKED


class _Inbox:
    """A streaming call's request messages (None: the client is done), for its one reader.

    A reader run by ``Server.run`` itself (the call's coroutine, before any task took it over)
    that finds it empty parks: ``put`` resumes it right where the message arrived. Any other
    reader (a task) waits on a future, as with ``asyncio.Queue`` (which one reader and no bound
    need not pay for)."""

    __slots__ = ("driving", "items", "loop", "resume", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: collections.deque[bytes | None] = collections.deque()
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.driving = False  # Server.run is running the call's coroutine right now
        self.resume: Callable[[BaseException | None], None] | None = None  # while it is parked

    def put(self, item: bytes | None) -> None:
        self.items.append(item)
        if self.resume is not None:
            resume, self.resume = self.resume, None
            resume(None)
            return
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes | None:
        while not self.items:
            if self.driving:
                await _Park()
            else:
                self.waiter = self.loop.create_future()
                await self.waiter
        return self.items.popleft()


class _Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.inbox = bytearray()
        self.preface = False
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.table_generation = 0  # bumps whenever a decode may have changed the HPACK table
        self.decoded: dict[tuple[int, bytes], tuple[str, tuple[tuple[str, str | bytes], ...]]] = {}
        self.calls: dict[int, _Call] = {}
        self.headers_for: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self.last_stream = 0
        self.peer_window = 65_535  # the peer's initial stream window
        self.peer_frame = 16_384
        self.send_window = 65_535  # connection level, toward the peer
        self.unacked = 0  # bytes received and not yet given back with WINDOW_UPDATE (connection)
        self.blocked: dict[int, _Call] = {}
        self.out: list[bytes] = []
        self.flushing = False
        self.going_away = False
        self.closing = False  # the last GOAWAY is out: the socket closes once the calls are done
        self.eof = False

    # -- the socket ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):  # grpc's spelling: ipv4:HOST:PORT, ipv6:[HOST]:PORT
            self.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if len(peer) == 4 else f"ipv4:{peer[0]}:{peer[1]}"
        else:
            self.peer = str(peer)
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        settings = struct.pack(
            ">HLHLHL",
            SETTINGS_MAX_CONCURRENT_STREAMS,
            MAX_STREAMS,
            SETTINGS_INITIAL_WINDOW_SIZE,
            WINDOW,
            SETTINGS_MAX_HEADER_LIST_SIZE,
            MAX_HEADER_LIST,
        )
        self.write(_frame(SETTINGS, 0, 0, settings) + _frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", WINDOW - 65_535)))
        self.server.connections.add(self)
        if self.server.stopping:
            self.goaway(final=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in self.calls.values():
            call.cancel()
        self.calls.clear()
        self.blocked.clear()

    # A peer that sends faster than it reads our answers (PINGs, or calls whose answers it never
    # takes) fills the socket's write buffer: stop reading it until the buffer drains.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def close(self, code: int) -> None:
        self.write(_frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream, code)))
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def goaway(self, *, final: bool) -> None:
        """No new calls on this connection; those under way finish. First a notice (the highest
        stream id, as HTTP/2 suggests for a graceful stop: a call the peer sent meanwhile is
        still served), then, ``final``, the last stream served and a close once calls are done."""
        if self.closing:
            return
        if final:
            self.going_away = self.closing = True
            self.write(_frame(GOAWAY, 0, 0, struct.pack(">LL", self.last_stream, NO_ERROR)))
            self._maybe_closed()
        elif not self.going_away:
            self.going_away = True
            self.write(_frame(GOAWAY, 0, 0, struct.pack(">LL", MAX_WINDOW, NO_ERROR)))

    # -- frames in -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        inbox = self.inbox
        inbox += data
        if not self.preface:
            if inbox[: len(PREFACE)] != PREFACE[: len(inbox)]:
                self.close(PROTOCOL_ERROR)  # not HTTP/2 with prior knowledge: say so at once
                return
            if len(inbox) < len(PREFACE):
                return
            del inbox[: len(PREFACE)]
            self.preface = True
        offset = 0
        size = len(inbox)
        view = memoryview(inbox)
        try:
            while size - offset >= 9:
                high, low, kind, flags, stream = _FRAME.unpack_from(inbox, offset)
                length = high << 8 | low
                if length > MAX_FRAME:
                    raise _ProtocolError(FRAME_SIZE_ERROR)
                end = offset + 9 + length
                if end > size:
                    break
                self.frame(kind, flags, stream & 0x7FFFFFFF, bytes(view[offset + 9 : end]))
                offset = end
        except _ProtocolError as error:
            view.release()
            log.warning("closing a gRPC connection: protocol error", extra=logs.fields(peer=self.peer, code=error.code))
            self.close(error.code)
            return
        except Exception:  # a bug of ours: this connection ends with a GOAWAY, the server serves on
            view.release()
            log.exception("closing a gRPC connection: internal error", extra=logs.fields(peer=self.peer))
            self.close(INTERNAL_ERROR)
            return
        view.release()
        del inbox[:offset]
        if self.out:
            self.flush()

    def frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self.headers_for is not None and kind != CONTINUATION:
            raise _ProtocolError(PROTOCOL_ERROR)
        if kind == DATA:
            if stream == 0:
                raise _ProtocolError(PROTOCOL_ERROR)
            self.on_data(stream, flags, payload)
        elif kind == HEADERS:
            if flags & PADDED:
                payload = _unpad(payload)
            if flags & PRIORITY_FLAG:
                if len(payload) < 5:
                    raise _ProtocolError(FRAME_SIZE_ERROR)
                payload = payload[5:]
            if flags & END_HEADERS:
                self.on_headers(stream, flags, payload)
            else:
                self.headers_for = (stream, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self.headers_for is None or self.headers_for[0] != stream:
                raise _ProtocolError(PROTOCOL_ERROR)
            if len(self.headers_for[2]) + len(payload) > MAX_HEADER_BLOCK:
                raise _ProtocolError(PROTOCOL_ERROR)  # a CONTINUATION flood
            self.headers_for[2].extend(payload)
            if flags & END_HEADERS:
                first_flags, block = self.headers_for[1], bytes(self.headers_for[2])
                self.headers_for = None
                self.on_headers(stream, first_flags, block)
        else:
            self.control(kind, flags, stream, payload)

    def control(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        """Frames about the connection or a stream's state, not its content."""
        if kind == SETTINGS:
            if stream != 0:
                raise _ProtocolError(PROTOCOL_ERROR)
            if len(payload) % 6 or (flags & ACK and payload):
                raise _ProtocolError(FRAME_SIZE_ERROR)
            if not flags & ACK:
                self.on_settings(payload)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise _ProtocolError(FRAME_SIZE_ERROR)
            self.on_window_update(stream, struct.unpack(">L", payload)[0] & 0x7FFFFFFF)
        elif kind == PING:
            if stream != 0:
                raise _ProtocolError(PROTOCOL_ERROR)
            if len(payload) != 8:
                raise _ProtocolError(FRAME_SIZE_ERROR)
            if not flags & ACK:
                self.write(_frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if stream == 0:
                raise _ProtocolError(PROTOCOL_ERROR)
            if len(payload) != 4:
                raise _ProtocolError(FRAME_SIZE_ERROR)
            call = self.calls.pop(stream, None)
            self.blocked.pop(stream, None)
            if call is not None:
                call.cancel()
            self._maybe_closed()
        elif kind == GOAWAY:  # the peer opens no more streams: close once its calls are answered
            self.going_away = self.closing = True
            self._maybe_closed()
        elif kind == PUSH_PROMISE:
            raise _ProtocolError(PROTOCOL_ERROR)
        # PRIORITY and unknown frame types are ignored, as HTTP/2 asks

    def on_settings(self, payload: bytes) -> None:
        for index in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, index)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolError(FLOW_CONTROL_ERROR)
                delta = value - self.peer_window
                self.peer_window = value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value < 1 << 24:
                    raise _ProtocolError(PROTOCOL_ERROR)
                self.peer_frame = value
        self.write(_frame(SETTINGS, ACK, 0))
        self.resume()

    def on_window_update(self, stream: int, increment: int) -> None:
        if increment == 0:
            raise _ProtocolError(PROTOCOL_ERROR)
        if stream == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ProtocolError(FLOW_CONTROL_ERROR)
        else:
            call = self.calls.get(stream)
            if call is None:
                return
            call.send_window += increment
            if call.send_window > MAX_WINDOW:
                raise _ProtocolError(FLOW_CONTROL_ERROR)
        self.resume()

    def on_headers(self, stream: int, flags: int, block: bytes) -> None:
        call = self.calls.get(stream)
        decoded = self.decode(block)
        if call is not None:  # trailers from the client: the request is complete
            if flags & END_STREAM:
                self.end_of_requests(call)
            return
        if stream % 2 == 0:
            raise _ProtocolError(PROTOCOL_ERROR)
        if stream <= self.last_stream:  # a stream already closed (or an id used out of order)
            self.write(_frame(RST_STREAM, 0, stream, struct.pack(">L", STREAM_CLOSED)))
            return
        self.last_stream = stream
        if self.closing or len(self.calls) >= MAX_STREAMS:
            self.write(_frame(RST_STREAM, 0, stream, struct.pack(">L", REFUSED_STREAM)))
            return
        path, metadata = decoded
        handler = self.server.handler(path, metadata)
        call = _Call(self, stream, handler, metadata)
        self.calls[stream] = call
        if handler is None:
            call.remote_closed = bool(flags & END_STREAM)
            call.finish(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path[:200]}")
            return
        if handler.request_streaming:
            call.queue = _Inbox(self.loop)
            if flags & END_STREAM:  # no request message: it finds the end at once
                call.remote_closed = True
                call.queue.put(None)
            self.server.spawn(call)
        elif flags & END_STREAM:
            self.end_of_requests(call)

    def decode(self, block: bytes) -> tuple[str, tuple[tuple[str, str | bytes], ...]]:
        """The call's path and metadata. A block that left the HPACK table as it was (indexed
        fields and literals without indexing: Envoy's blocks once its table is warm) means the
        same until the table changes, so its meaning is remembered per state of the table."""
        found = self.decoded.get((self.table_generation, block))
        if found is not None:
            return found
        table = self.decoder.header_table
        before = _TableState(table)
        try:
            fields = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise _ProtocolError(COMPRESSION_ERROR) from exc
        path = ""
        metadata: list[tuple[str, str | bytes]] = []
        for raw_name, raw_value in fields:
            name = raw_name.decode("latin-1")
            if name == ":path":
                path = raw_value.decode("latin-1")
            elif name and name[0] != ":" and name not in _RESERVED:
                value = raw_value.decode("latin-1")
                metadata.append((name, _binary(raw_value) if name.endswith("-bin") else value))
        result = (path, tuple(metadata))
        if before.same(table) and len(block) <= CACHED_BLOCK:
            if len(self.decoded) > 256:
                self.decoded.clear()
            self.decoded[self.table_generation, block] = result
        else:
            self.table_generation += 1
        return result

    def on_data(self, stream: int, flags: int, payload: bytes) -> None:
        received = len(payload)
        self.unacked += received  # connection level: given back at once, so no stream holds up others
        if self.unacked >= WINDOW // 2:
            self.write(_frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", self.unacked)))
            self.unacked = 0
        call = self.calls.get(stream)
        if call is None or call.remote_closed:
            return
        call.outstanding += received
        if call.outstanding > WINDOW:  # the peer sent past the window we granted
            raise _ProtocolError(FLOW_CONTROL_ERROR)
        if flags & PADDED:
            payload = _unpad(payload)
        if call.done:  # answered already (its last frames may wait for window): nothing to read
            payload = b""
        # Stream level: what a streaming call has queued is given back as its handler reads it
        # (``_requests``), so a slow handler holds at most a window of messages. A unary call
        # holds one message at most, so it is given back at once.
        self.credit(call, received - len(payload) if call.queue is not None else received, flags)
        buffer = call.buffer
        buffer += payload
        arrived: list[bytes] = []  # a streaming call's whole messages, handed over below
        while len(buffer) >= 5 and not call.done:
            compressed, length = _MESSAGE.unpack_from(buffer)
            if compressed:
                call.finish(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not supported")
            elif length > MAX_MESSAGE:
                call.finish(grpc.StatusCode.RESOURCE_EXHAUSTED, f"message larger than {MAX_MESSAGE} bytes")
            elif call.queue is None and call.received:
                call.finish(grpc.StatusCode.INTERNAL, "a unary call takes one request message")
            elif len(buffer) < 5 + length:
                break
            else:
                message = bytes(buffer[5 : 5 + length])
                del buffer[: 5 + length]
                if call.queue is not None:
                    arrived.append(message)
                else:
                    call.received.append(message)
                continue
            self.reset(call)  # answered an error: nothing more of this call is read
        if arrived and call.queue is not None:
            # A handler runs as its messages are handed over: let it know first whether the
            # client is done, so an answer ending the call ends the stream without a reset.
            call.remote_closed = call.remote_closed or bool(flags & END_STREAM)
            for message in arrived:
                call.queue.put(message)
        if flags & END_STREAM:
            self.end_of_requests(call)

    def credit(self, call: _Call, size: int, flags: int = 0) -> None:
        """Give ``size`` bytes of the stream's window back to the peer (in batches)."""
        call.unacked += size
        if call.unacked >= WINDOW // 2 and not flags & END_STREAM and not call.remote_closed:
            self.write(_frame(WINDOW_UPDATE, 0, call.id, struct.pack(">L", call.unacked)))
            call.outstanding -= call.unacked
            call.unacked = 0

    def end_of_requests(self, call: _Call) -> None:
        call.remote_closed = True
        if call.done:
            self.forget(call)
        elif call.queue is not None:
            call.queue.put(None)
        elif call.task is None:
            self.server.spawn(call)

    # -- frames out ----------------------------------------------------------------------

    def send_data(self, call: _Call, payload: bytes) -> None:
        if not call.headers_sent:
            call.headers_sent = True
            self.write(_frame(HEADERS, END_HEADERS, call.id, _RESPONSE_HEADERS))
        call.pending.append((payload, False))
        self.drain(call)

    def send_answer(self, call: _Call, data: bytes) -> None:
        """Headers, one message and OK trailers: one write when flow control lets it all out now."""
        size = len(data)
        if call.headers_sent or call.pending or size > min(self.send_window, call.send_window, self.peer_frame):
            self.send_data(call, data)
            self.send_trailers(call, _OK_TRAILERS)
            return
        call.headers_sent = True
        self.send_window -= size
        call.send_window -= size
        self.write(
            _frame(HEADERS, END_HEADERS, call.id, _RESPONSE_HEADERS)
            + _frame(DATA, 0, call.id, data)
            + _frame(HEADERS, END_HEADERS | END_STREAM, call.id, _OK_TRAILERS)
        )
        self.ended(call)

    def send_trailers(self, call: _Call, block: bytes) -> None:
        if not call.headers_sent:  # trailers-only answer
            call.headers_sent = True
            self.write(_frame(HEADERS, END_HEADERS | END_STREAM, call.id, _RESPONSE_HEADERS + block))
            self.ended(call)
            return
        call.pending.append((block, True))
        self.drain(call)

    def drain(self, call: _Call) -> None:
        """Send what flow control allows of the call's pending frames; hold the rest."""
        pending = call.pending
        while pending:
            payload, trailers = pending[0]
            if trailers:
                pending.pop(0)
                self.write(_frame(HEADERS, END_HEADERS | END_STREAM, call.id, payload))
                self.blocked.pop(call.id, None)
                self.ended(call)
                return
            room = min(self.send_window, call.send_window, self.peer_frame)
            if room <= 0:
                self.blocked[call.id] = call
                return
            chunk, rest = payload[:room], payload[room:]
            self.write(_frame(DATA, 0, call.id, chunk))
            self.send_window -= len(chunk)
            call.send_window -= len(chunk)
            if rest:
                pending[0] = (rest, False)
            else:
                pending.pop(0)
        self.blocked.pop(call.id, None)

    def resume(self) -> None:
        for call in list(self.blocked.values()):
            self.drain(call)

    def ended(self, call: _Call) -> None:
        if call.remote_closed:
            self.forget(call)
        elif call.id in self.calls:
            # We answered before the client finished sending: it need not send the rest.
            self.write(_frame(RST_STREAM, 0, call.id, struct.pack(">L", NO_ERROR)))
            self.forget(call)

    def reset(self, call: _Call) -> None:
        """Answered with an error before the request was whole: read no more of it, stop it."""
        call.buffer.clear()
        call.remote_closed = True
        call.cancel()

    def abandon(self, call: _Call) -> None:
        """End a call that cannot be answered properly: RST_STREAM(INTERNAL_ERROR)."""
        call.done = call.cancelled = True
        self.blocked.pop(call.id, None)
        self.write(_frame(RST_STREAM, 0, call.id, struct.pack(">L", INTERNAL_ERROR)))
        self.forget(call)

    def forget(self, call: _Call) -> None:
        self.calls.pop(call.id, None)
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self.closing and not self.calls and not self.eof and self.transport is not None:
            self.eof = True
            self.flush()
            # Half-close and let the peer close: closing at once would answer bytes it sent
            # before it read our GOAWAY with a TCP reset, and it would never read the GOAWAY.
            try:
                self.transport.write_eof()
            except (OSError, NotImplementedError, RuntimeError):  # the peer is gone already
                self.transport.close()
            else:
                self.loop.call_later(GOAWAY_NOTICE * 2, self.transport.close)


_RESERVED = frozenset({"te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


class _TableState:
    """What any change to an HPACK dynamic table changes: its length, its bound, or its newest
    entry (an insertion puts a new tuple in front; evictions come only with one or a resize)."""

    __slots__ = ("length", "maxsize", "newest")

    def __init__(self, table: Any) -> None:
        entries = table.dynamic_entries
        self.length, self.maxsize = len(entries), table.maxsize
        self.newest = entries[0] if entries else None  # held: its identity is what is compared

    def same(self, table: Any) -> bool:
        entries = table.dynamic_entries
        newest = entries[0] if entries else None
        return len(entries) == self.length and table.maxsize == self.maxsize and newest is self.newest


def _unpad(payload: bytes) -> bytes:
    """A PADDED frame's content: a pad length, the content, that many bytes of padding."""
    if not payload or payload[0] >= len(payload):
        raise _ProtocolError(PROTOCOL_ERROR)
    return payload[1 : len(payload) - payload[0]]


def _binary(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return value


class _ProtocolError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Server:
    """A ``grpc.aio.Server`` look-alike for the calls the sidecars serve (see the module doc)."""

    def __init__(self) -> None:
        self.methods: dict[str, Any] = {}
        self.generic: list[Any] = []
        self.sockets: list[socket.socket] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        self.calls: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.stopped = asyncio.Event()

    # -- what grpc's generated code and our kernel call ----------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    def add_insecure_port(self, address: str) -> int:
        """Bind ``host:port`` now (SO_REUSEPORT: one port for every worker); 0 when it cannot."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, int(port)))
        except (OSError, ValueError):
            sock.close()
            return 0
        sock.setblocking(False)
        self.sockets.append(sock)
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
            self.servers.append(server)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; tell every connection to go away (a notice, then the last stream
        served); give calls under way ``grace`` seconds (None: no limit), then cancel what is
        left and close."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        for server in self.servers:
            server.close()
        for connection in list(self.connections):
            connection.goaway(final=False)
        if self.connections and grace != 0:
            await asyncio.sleep(GOAWAY_NOTICE if grace is None else min(GOAWAY_NOTICE, grace))
        for connection in list(self.connections):
            connection.goaway(final=True)
        while any(c.calls for c in self.connections) and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.02)
        for task in list(self.calls):
            task.cancel()
        for connection in list(self.connections):
            for call in list(connection.calls.values()):
                call.interrupt()  # parked calls have no task to cancel
        await asyncio.sleep(0)  # cancelled calls send their CANCELLED trailers
        for connection in list(self.connections):
            connection.flush()
            if connection.transport is not None:
                connection.transport.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.stopped.set()

    async def wait_for_termination(self) -> None:
        await self.stopped.wait()

    # -- calls ---------------------------------------------------------------------------

    def handler(self, path: str, metadata: tuple[tuple[str, str | bytes], ...]) -> Any:
        found = self.methods.get(path)
        if found is None:
            details = HandlerCallDetails(path, metadata)
            for generic in self.generic:
                found = generic.service(details)
                if found is not None:
                    break
        return found

    def spawn(self, call: _Call) -> None:
        self.run(call, self.serve_call(call), contextvars.copy_context(), None)

    def run(self, call: _Call, coro: Any, context: contextvars.Context, error: BaseException | None) -> None:
        """Run a call's coroutine, here and now, until it waits (as Python 3.12's eager tasks do).

        A call answered without waiting (authz, ratelimit) costs no task and no extra turn of
        the loop: its answer leaves with the others of this read. A call waiting for its next
        request message (ext_proc) parks until ``_Inbox.put`` runs it again, where the message
        arrived. Waiting for anything else, a task takes it over for good. So a handler's code
        up to its first such wait runs outside any task: ``asyncio.current_task()`` is None
        there, and ``asyncio.timeout`` belongs in a task of its own (the key cache, JWKS and
        introspection fetches, the Redis batches already are).
        """
        inbox = call.queue
        if inbox is not None:
            inbox.driving = True
        try:
            waiting = context.run(coro.send, None) if error is None else context.run(coro.throw, error)
        except StopIteration:
            return
        finally:
            if inbox is not None:
                inbox.driving = False
        if waiting is _PARKED and inbox is not None and not call.cancelled:
            inbox.resume = functools.partial(self.run, call, coro, context)
            return
        if waiting is _PARKED:  # cancelled meanwhile: stop it now
            self.run(call, coro, context, asyncio.CancelledError())
            return
        # Forgotten by serve_call itself (or by cancel, if it never ran): a done callback would
        # cost every call one more turn of the event loop. The connection's loop, because
        # asyncio.get_running_loop() makes a getpid system call each time.
        task = call.task = call.connection.loop.create_task(_Resumed(coro, waiting), context=context)
        self.calls.add(task)

    async def serve_call(self, call: _Call) -> None:
        try:
            await self._serve(call)
        except Exception:  # a bug of ours while answering: this call ends, the rest go on
            log.exception("unexpected error in a gRPC call", extra=logs.fields(method=_method_name(call.handler)))
            call.connection.abandon(call)
        finally:
            self.calls.discard(call.task)

    async def _serve(self, call: _Call) -> None:
        handler = call.handler
        context = Context(call)
        try:
            if handler.request_streaming:
                requests = _requests(call, handler.request_deserializer)
                if handler.response_streaming:
                    await _stream_out(call, handler.stream_stream(requests, context))
                else:
                    call.send_message(await handler.stream_unary(requests, context))
            else:
                if len(call.received) != 1:
                    call.finish(grpc.StatusCode.INTERNAL, f"expected one request message, got {len(call.received)}")
                    return
                request = _parse(handler.request_deserializer, call.received.pop())
                if handler.response_streaming:
                    await _stream_out(call, handler.unary_stream(request, context))
                else:
                    response = handler.unary_unary(request, context)
                    message = await response if hasattr(response, "__await__") else response
                    if context.code is grpc.StatusCode.OK:
                        call.answer(message)
                    else:
                        call.send_message(message)
            call.finish(context.code, context.details)
        except _Abort as abort:
            call.finish(abort.code, abort.details)
        except _Unreadable:
            call.finish(grpc.StatusCode.INVALID_ARGUMENT, "the request message cannot be parsed")
        except asyncio.CancelledError:
            if not call.done:  # stopped by us, not reset by the client: say so
                call.finish(grpc.StatusCode.CANCELLED, "server stopping")
        except NotImplementedError:  # generated servicer base classes: the method is not served
            code = context.code if context.code is not grpc.StatusCode.OK else grpc.StatusCode.UNIMPLEMENTED
            call.finish(code, context.details or "method not implemented")
        except Exception:
            log.exception("unexpected error in a gRPC call", extra=logs.fields(method=_method_name(handler)))
            call.finish(grpc.StatusCode.INTERNAL, "internal error")


class _Resumed:
    """A call's coroutine, already run up to its first wait, as the coroutine a task drives:
    the task's first step gets that wait's future; everything else (a cancel before the first
    step included) goes to the call's coroutine, so its handler always hears of it."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Any, waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def send(self, value: Any) -> Any:
        waiting, self.waiting = self.waiting, None
        return waiting if waiting is not None else self.coro.send(value)

    def throw(self, *error: Any) -> Any:
        self.waiting = None
        return self.coro.throw(*error)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:  # not awaited: a task drives it through send and throw
        raise TypeError("a resumed call is driven by its task")


collections.abc.Coroutine.register(_Resumed)


class _Unreadable(Exception):  # noqa: N818 - a request message that is not what the method takes
    pass


def _parse(deserialize: Callable[[bytes], Any] | None, message: bytes) -> Any:
    if deserialize is None:
        return message
    try:
        return deserialize(message)
    except Exception as exc:
        raise _Unreadable from exc


async def _requests(call: _Call, deserialize: Callable[[bytes], Any] | None) -> AsyncIterator[Any]:
    queue = call.queue
    assert queue is not None
    while True:
        message = await queue.get()
        if message is None:
            return
        call.connection.credit(call, len(message) + 5)  # read: the peer may send as much again
        yield _parse(deserialize, message)


async def _stream_out(call: _Call, produced: Any) -> None:
    if hasattr(produced, "__aiter__"):
        async for message in produced:
            call.send_message(message)
    else:  # a coroutine that writes through its context (health's Watch)
        result = await produced
        if result is not None:
            call.send_message(result)


def _method_name(handler: Any) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind, None)
        if behaviour is not None:
            return getattr(behaviour, "__qualname__", kind)
    return "?"


__all__: Sequence[str] = ("Context", "Server")
