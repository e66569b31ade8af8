"""Header blocks in: HPACK decoding (the ``hpack`` package), the rules of RFC 9113 §8.2-8.3 and
of gRPC over HTTP/2 for a request's headers and trailers, and a cache of decoded blocks.

The cache: a block whose decoding left the HPACK table unchanged (indexed fields and literals
without indexing, as Envoy's blocks are once its table is warm) means the same until the table
changes, so its meaning is remembered per state of the table. It is small and bounded in entries
and in the decoded bytes an entry may stand for, so it cannot amplify what a peer sends.

A block that breaks HPACK is a connection error (COMPRESSION_ERROR). A request that breaks
HTTP/2's header rules is malformed: ``Malformed``, a stream error (PROTOCOL_ERROR), raised only
after the whole block was decoded so the table stays in step with the peer's. A well-formed
request that gRPC refuses (a content-type that is not gRPC's, a method other than POST, too
large a header list) gets an HTTP status: ``RequestHead.refusal``.
"""

from __future__ import annotations

import base64
import re
from typing import Any, NamedTuple, cast

import hpack

from sidegate.grpc_h2c import limits
from sidegate.grpc_h2c.frames import COMPRESSION_ERROR

Metadata = tuple[tuple[str, str | bytes], ...]


class Malformed(Exception):  # noqa: N818 - RFC 9113 §8.1.1's word: a stream error, PROTOCOL_ERROR
    """A request or trailer block that breaks RFC 9113 §8 (the reason is for logs)."""


class CompressionError(Exception):
    """A block HPACK cannot decode, or one past the decoding bound: the connection ends."""

    code = COMPRESSION_ERROR


class Refusal(NamedTuple):
    """An answer without a call: HTTP ``status`` with a gRPC ``code`` and ``details``."""

    status: int
    code: int
    details: str


class RequestHead(NamedTuple):
    """What a request's header block says, checked."""

    path: str
    metadata: Metadata
    timeout: float | None  # seconds, from grpc-timeout
    content_length: int  # -1 when absent
    size: int  # decoded size, as RFC 7541 §4.1 counts it
    refusal: Refusal | None


# Field names: an RFC 9110 token in lower case (RFC 9113 §8.2.1: no upper case, no controls,
# no space, nothing past 0x7e).
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_RESERVED = frozenset(
    {b"te", b"content-type", b"content-length", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"}
)
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
_INTERNAL, _UNIMPLEMENTED = 13, 12


def _check_value(name: bytes, value: bytes) -> None:
    # RFC 9113 §8.2.1: no NUL, CR or LF anywhere, no leading or trailing space or tab.
    if b"\0" in value or b"\r" in value or b"\n" in value:
        raise Malformed(f"{name[:40]!r}: a forbidden character in the value")
    if value and (value[0] in (0x20, 0x09) or value[-1] in (0x20, 0x09)):
        raise Malformed(f"{name[:40]!r}: white space around the value")


def _binary(value: bytes) -> bytes:
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    except ValueError:
        return value


def parse_request(fields: list[tuple[bytes, bytes]], max_size: int) -> RequestHead:  # noqa: PLR0915 - §8.3, in order
    """Check a decoded request header list and say what it asks for (see the module doc)."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    size = 0
    metadata: list[tuple[str, str | bytes]] = []
    content_type = te = timeout = encoding = length = None
    for name, value in fields:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if regular:
                raise Malformed(f"{name[:40]!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise Malformed(f"unknown pseudo-header {name[:40]!r}")
            if name in pseudo:
                raise Malformed(f"{name!r} twice")
            _check_value(name, value)
            pseudo[name] = value
            continue
        regular = True
        if _NAME.fullmatch(name) is None:
            raise Malformed(f"field name {name[:40]!r}: upper case or a character a name cannot have")
        _check_value(name, value)
        if name in _RESERVED:
            if name == b"content-type":
                content_type = value
            elif name == b"te":
                te = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
            elif name == b"content-length":
                if length is not None or not value.isdigit():
                    raise Malformed("content-length twice or not a number")
                length = int(value)
            continue
        if name in _CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name!r}")
        text = value.decode("latin-1")
        metadata.append((name.decode("latin-1"), _binary(value) if name.endswith(b"-bin") else text))
    if te is not None and te != b"trailers":
        raise Malformed("te other than trailers")
    for required in (b":method", b":scheme", b":path"):
        if not pseudo.get(required):
            raise Malformed(f"no {required.decode()}")
    path = pseudo[b":path"].decode("latin-1")
    refusal = None
    seconds = None
    if size > max_size:
        refusal = Refusal(431, _INTERNAL, "header list too large")
    elif pseudo[b":method"] != b"POST":
        refusal = Refusal(405, _INTERNAL, "gRPC takes POST only")
    elif content_type is None or not _grpc_content_type(content_type):
        refusal = Refusal(415, _INTERNAL, "content-type is not application/grpc")
    elif timeout is not None:
        match = _TIMEOUT.fullmatch(timeout)
        if match is None:
            refusal = Refusal(400, _INTERNAL, "malformed grpc-timeout")
        else:
            seconds = int(match[1]) * _UNITS[match[2]]
    if refusal is None and encoding is not None and encoding != b"identity":
        refusal = Refusal(200, _UNIMPLEMENTED, f"grpc-encoding {encoding[:40].decode('latin-1')} is not supported")
    return RequestHead(path, tuple(metadata), seconds, -1 if length is None else length, size, refusal)


def _grpc_content_type(value: bytes) -> bool:
    return value.startswith(b"application/grpc") and (len(value) == 16 or value[16] in b"+;")


def check_trailers(fields: list[tuple[bytes, bytes]]) -> None:
    """Request trailers carry no pseudo-header and follow the same field rules (RFC 9113 §8.1)."""
    for name, value in fields:
        if name[:1] == b":":
            raise Malformed(f"pseudo-header {name[:40]!r} in trailers")
        if _NAME.fullmatch(name) is None:
            raise Malformed(f"field name {name[:40]!r}: upper case or a character a name cannot have")
        if name in _CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific field {name!r}")
        _check_value(name, value)


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


class HeaderDecoder:
    """One connection's HPACK decoder, with the rules above and the cache of checked blocks."""

    __slots__ = ("cache", "decoder", "generation", "max_size")

    def __init__(self, max_size: int = limits.MAX_HEADER_LIST_SIZE) -> None:
        # hpack stops decoding past its bound; ours (max_size) is checked after a whole decode.
        self.decoder = hpack.Decoder(max_header_list_size=2 * max_size)
        self.max_size = max_size
        self.generation = 0  # bumps whenever a decode may have changed the HPACK table
        self.cache: dict[tuple[int, bytes], RequestHead] = {}

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return cast("list[tuple[bytes, bytes]]", self.decoder.decode(block, raw=True))
        except hpack.HPACKError as exc:
            raise CompressionError(str(exc)) from exc

    def request(self, block: bytes) -> RequestHead:
        """A request's header block, checked (raises ``Malformed`` or ``CompressionError``)."""
        key = (self.generation, block)
        found = self.cache.get(key)
        if found is not None:
            return found
        table = self.decoder.header_table
        before = _TableState(table)
        fields = self._decode(block)
        if not before.same(table):
            self.generation += 1
            return parse_request(fields, self.max_size)
        head = parse_request(fields, self.max_size)  # raises before anything is remembered
        if len(block) <= limits.CACHED_BLOCK and head.size <= limits.CACHED_HEADERS:
            if len(self.cache) >= limits.CACHE_ENTRIES:
                self.cache.clear()
            self.cache[key] = head
        return head

    def trailers(self, block: bytes) -> None:
        """A request's trailer block: decoded to keep the table in step, checked, dropped."""
        table = self.decoder.header_table
        before = _TableState(table)
        fields = self._decode(block)
        if not before.same(table):
            self.generation += 1
        check_trailers(fields)
