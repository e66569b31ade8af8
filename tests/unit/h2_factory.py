"""A frame factory and a recording listener, to drive ``sidegate.grpc_h2c.connection`` byte by
byte with no sockets: build frames (and HPACK blocks) as a client would, feed them in, read the
frames the server wrote and the events its listener heard."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import hpack

from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.connection import Connection
from sidegate.grpc_h2c.headers import RequestHead
from sidegate.grpc_h2c.limits import Budget, Limits
from sidegate.grpc_h2c.streams import Stream

PATH = "/t.T/Echo"


def request_headers(path: str = PATH, **extra: str) -> list[tuple[str, str]]:
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "sidecar")]
    fields += [("content-type", "application/grpc"), ("te", "trailers")]
    return fields + [(k.replace("_", "-"), v) for k, v in extra.items()]


def message(payload: bytes) -> bytes:
    return struct.pack(">BL", 0, len(payload)) + payload


class Client:
    """Builds what a client sends, with its own HPACK encoder."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()

    def block(self, fields: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(fields))

    def preface(self, *settings: tuple[int, int]) -> bytes:
        return frames.PREFACE + frames.settings(*settings)

    def headers(self, stream: int, fields: list[tuple[str, str]] | None = None, *, end_stream: bool = False) -> bytes:
        flags = frames.END_HEADERS | (frames.END_STREAM if end_stream else 0)
        return frames.frame(frames.HEADERS, flags, stream, self.block(fields or request_headers()))

    def data(self, stream: int, payload: bytes, *, end_stream: bool = False) -> bytes:
        return frames.frame(frames.DATA, frames.END_STREAM if end_stream else 0, stream, payload)

    def call(self, stream: int, payload: bytes = b"hi", fields: list[tuple[str, str]] | None = None) -> bytes:
        return self.headers(stream, fields) + self.data(stream, message(payload), end_stream=True)


@dataclass
class Recorder:
    """A listener that writes down what it heard, and answers nothing unless told to."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    answer: bool = False  # answer every whole unary request with its message, at once

    def request(self, stream: Any, head: RequestHead, end_stream: bool) -> None:
        self.events.append(("request", stream.id, head.path, end_stream))

    def data(self, stream: Any, messages: list[bytes], end_stream: bool) -> int:
        self.events.append(("data", stream.id, tuple(messages), end_stream))
        if self.answer and end_stream:
            stream.conn.send_answer(stream, message(b"".join(messages)))
        return sum(len(each) + 5 for each in messages)  # taken at once

    def fail(self, stream: Any, code: int, details: str) -> None:
        self.events.append(("fail", stream.id, code, details))
        stream.conn.send_trailers(stream, frames.trailers(code, details))

    def reset(self, stream: Any) -> None:
        self.events.append(("reset", stream.id))


@dataclass
class Sent:
    kind: int
    flags: int
    stream: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a GOAWAY or RST_STREAM."""
        if self.kind == frames.GOAWAY:
            return int(struct.unpack_from(">L", self.payload, 4)[0])
        return int(struct.unpack(">L", self.payload)[0])


def parse(data: bytes) -> list[Sent]:
    out, offset = [], 0
    while offset + 9 <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        kind, flags = data[offset + 3], data[offset + 4]
        stream = int.from_bytes(data[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
        out.append(Sent(kind, flags, stream, data[offset + 9 : offset + 9 + length]))
        offset += 9 + length
    return out


class Harness:
    """One server-side connection, its listener, and what it sent."""

    def __init__(self, limits: Limits | None = None, *, answer: bool = False, budget: Budget | None = None) -> None:
        self.limits = limits or Limits()
        self.listener = Recorder(answer=answer)
        self.budget = budget or Budget(self.limits.worker_buffer)
        self.conn = Connection(self.listener, self.limits, self.budget, 0.0, Stream)
        self.conn.initiate()
        self.client = Client()
        self.take()  # our SETTINGS and WINDOW_UPDATE

    def take(self) -> list[Sent]:
        data = b"".join(self.conn.out)
        self.conn.out.clear()
        return parse(data)

    def feed(self, data: bytes) -> list[Sent]:
        self.conn.receive(data)
        return self.take()

    def start(self) -> list[Sent]:
        return self.feed(self.client.preface())

    @property
    def events(self) -> list[tuple[Any, ...]]:
        return self.listener.events

    def goaway(self) -> int | None:
        """The code of the GOAWAY the connection ended with (None: it did not)."""
        return self.conn.terminated
