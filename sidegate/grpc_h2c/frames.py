"""HTTP/2 on the wire: frame, flag, error and setting numbers (RFC 9113 §6, §7), the frame header,
and the few HPACK encodings our answers use (RFC 7541 §5-6). Pure functions over bytes.

Our answers never touch the peer's HPACK dynamic table: they are built from the static table
and literals without indexing, so they can be built once and reused.
"""

from __future__ import annotations

import struct
import urllib.parse

from sidegate.grpc_h2c.limits import MAX_DETAILS

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x4, 0x5, 0x6, 0x7
CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x8, 0x9, 0xB

SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
MAX_FRAME = 16_384  # HTTP/2's default, which we never raise: a peer may send no larger frame
HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16 + 8), type, flags, stream id
MESSAGE = struct.Struct(">BL")  # gRPC's message prefix: compressed flag, length
_U32 = struct.Struct(">L")
_PAIR = struct.Struct(">LL")


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream) + payload


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, _U32.pack(code))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, _U32.pack(increment))


def goaway(last_stream: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, _PAIR.pack(last_stream, code))


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", key, value) for key, value in pairs))


def integer(value: int, prefix: int) -> bytes:
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


def literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing: our answers never touch the table."""
    return b"\x00" + integer(len(name), 7) + name + integer(len(value), 7) + value


# :status 200 (static index 8) and content-type (static name 31) = application/grpc
RESPONSE_HEADERS = b"\x88\x0f\x10" + integer(16, 7) + b"application/grpc"
OK_TRAILERS = literal(b"grpc-status", b"0")


def status_headers(status: int) -> bytes:
    """Response headers for an HTTP status other than 200 (a call refused before gRPC began)."""
    return literal(b":status", str(status).encode()) + b"\x0f\x10" + integer(16, 7) + b"application/grpc"


def trailers(code: int, details: str) -> bytes:
    """A trailer block: ``grpc-status`` and, percent-encoded and cut short, ``grpc-message``."""
    block = literal(b"grpc-status", str(code).encode())
    details = details[:MAX_DETAILS]
    if details:
        quoted = urllib.parse.quote(details, safe=" !#$&'()*+,/:;=?@[]~", errors="replace")  # lone surrogates
        block += literal(b"grpc-message", quoted.encode())
    return block
