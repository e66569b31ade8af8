"""``sidegate.grpc_h2c`` against grpcio's own client (C core) and raw sockets: every call shape,
status codes, messages larger than a frame and than the flow-control windows, many calls
interleaved on one connection (HPACK's table changing under them), resets, a graceful stop,
and garbage on the wire. Envoy's side is covered by every e2e test: the sidecars run on it."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from sidegate import grpc_h2c
from sidegate.grpc_h2c import frames, limits

SECRET = "sk_live_do_not_leak"
BIG = 6 << 20  # over the 4 MiB limit


class Probe:
    """Handlers over raw bytes, and what they saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def echo(self, request: bytes, context: grpc_h2c.Context) -> bytes:
        if request == b"abort":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input: naïve 100% wrong")
        if request == b"boom":
            raise RuntimeError(SECRET)
        if request == b"surrogate":  # a lone surrogate cannot be UTF-8: it must not break the trailers
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad: \ud800")
        if request == b"verbose":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "%" * 50_000)  # 150 KB percent-encoded
        if request == b"slow":
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request == b"pause":
            self.started.set()
            await asyncio.sleep(0.5)
        return request

    async def remaining(self, request: bytes, context: grpc_h2c.Context) -> bytes:
        if request == b"wait":
            await asyncio.sleep(30)  # past any deadline: the server ends it
        return str(context.time_remaining()).encode()

    async def aborting(self, request: bytes, context: grpc_h2c.Context) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, request.decode())
        return b""

    async def slow_aborting(self, request: bytes, context: grpc_h2c.Context) -> bytes:
        await asyncio.sleep(0.01)  # from a task
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, request.decode())
        return b""

    async def metadata(self, request: bytes, context: grpc_h2c.Context) -> bytes:
        pairs = [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-")]
        return json.dumps({"request": request.decode(), "metadata": pairs}).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: grpc_h2c.Context) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()

    async def mixed(self, requests: AsyncIterator[bytes], context: grpc_h2c.Context) -> AsyncIterator[bytes]:
        """Waits for messages (parked, no task) and, on "sleep", for something else (a task)."""
        try:
            async for request in requests:
                if request == b"sleep":
                    await asyncio.sleep(0.01)
                yield request.upper()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def first(self, requests: AsyncIterator[bytes], context: grpc_h2c.Context) -> AsyncIterator[bytes]:
        """Answers the first message and ends the call."""
        async for request in requests:
            yield request.upper()
            return

    async def reader(self, requests: AsyncIterator[bytes], context: grpc_h2c.Context) -> AsyncIterator[bytes]:
        """Reads the requests from a task of its own, then answers with all of them."""
        collected = await asyncio.create_task(_collect(requests))
        yield b"|".join(collected)

    async def hold(self, requests: AsyncIterator[bytes], context: grpc_h2c.Context) -> AsyncIterator[bytes]:
        await asyncio.sleep(30)  # never reads what the client sends
        yield b""

    async def count(self, request: bytes, context: grpc_h2c.Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()


async def _collect(requests: AsyncIterator[bytes]) -> list[bytes]:
    return [request async for request in requests]


def _decoded(decoder: Any, payload: bytes) -> dict[str, str]:
    """A header block as text: hpack decodes to str unless asked for raw bytes."""
    return {str(k): str(v) for k, v in decoder.decode(payload)}


def handlers(probe: Probe) -> Any:
    return grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(probe.echo),
            "Meta": grpc.unary_unary_rpc_method_handler(probe.metadata),
            "Remaining": grpc.unary_unary_rpc_method_handler(probe.remaining),
            "Abort": grpc.unary_unary_rpc_method_handler(probe.aborting),
            "SlowAbort": grpc.unary_unary_rpc_method_handler(probe.slow_aborting),
            "Chat": grpc.stream_stream_rpc_method_handler(probe.chat),
            "Hold": grpc.stream_stream_rpc_method_handler(probe.hold),
            "Mixed": grpc.stream_stream_rpc_method_handler(probe.mixed),
            "Reader": grpc.stream_stream_rpc_method_handler(probe.reader),
            "First": grpc.stream_stream_rpc_method_handler(probe.first),
            "Count": grpc.unary_stream_rpc_method_handler(probe.count),
        },
    )


Body = Callable[[grpc_h2c.Server, grpc.aio.Channel, Probe, int], Awaitable[None]]


def run(body: Body) -> None:
    async def main() -> None:
        probe = Probe()
        server = grpc_h2c.Server()
        server.add_generic_rpc_handlers([handlers(probe)])
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        await server.start()
        options = [("grpc.max_receive_message_length", BIG * 2), ("grpc.max_send_message_length", BIG * 2)]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                await body(server, channel, probe, port)
        finally:
            await server.stop(0)

    asyncio.run(main())


def unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(f"/t.T/{method}")


def test_unary_calls_carry_messages_of_every_size_both_ways() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        echo = unary(channel, "Echo")
        # empty, one frame, just over a frame, over the 64 KiB default windows, several MiB
        for size in (0, 1, 16_384, 16_385, 70_000, 3 << 20):
            payload = bytes(i % 251 for i in range(size))
            assert await echo(payload, timeout=10) == payload, size

    run(body)


def test_status_codes_and_details_reach_the_client_and_nothing_else_does() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        echo = unary(channel, "Echo")
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await echo(b"abort", timeout=5)
        assert aborted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert aborted.value.details() == "bad input: naïve 100% wrong"
        with pytest.raises(grpc.aio.AioRpcError) as crashed:
            await echo(b"boom", timeout=5)
        assert crashed.value.code() == grpc.StatusCode.INTERNAL
        assert SECRET not in (crashed.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await unary(channel, "Nope")(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as unreadable:  # not a HealthCheckRequest
            await channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff\xff", timeout=5)
        assert unreadable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as huge:
            await echo(b"x" * BIG, timeout=10)
        assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await echo(b"still serving", timeout=5) == b"still serving"

    run(body)


def test_many_interleaved_calls_each_get_their_own_answer_and_metadata() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        meta = unary(channel, "Meta")

        async def call(i: int) -> None:
            # Half repeat one header set (HPACK indexes it, then sends bare indexes: the
            # server's decode cache), half send a new value each time (the table changes).
            value = "same" if i % 2 else f"v{i}"
            answer = json.loads(await meta(str(i).encode(), metadata=(("x-n", value),), timeout=10))
            assert answer == {"request": str(i), "metadata": [["x-n", value]]}

        for _ in range(3):
            await asyncio.gather(*(call(i) for i in range(200)))

    run(body)


def test_streams_both_ways() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        chat = channel.stream_stream("/t.T/Chat")
        words = [f"word {i}".encode() for i in range(50)]

        async def send() -> AsyncIterator[bytes]:
            for word in words:
                yield word

        assert [m async for m in chat(send(), timeout=10)] == [w.upper() for w in words]
        count = channel.unary_stream("/t.T/Count")
        assert [m async for m in count(b"5", timeout=10)] == [b"0", b"1", b"2", b"3", b"4"]

    run(body)


def test_calls_run_at_once_park_for_their_messages_and_go_to_a_task_only_to_wait_for_more() -> None:
    async def body(server: grpc_h2c.Server, channel: grpc.aio.Channel, probe: Probe, _port: int) -> None:
        # answered without waiting: no task at all
        assert [await unary(channel, "Echo")(f"n{i}".encode(), timeout=5) for i in range(20)][-1] == b"n19"
        assert not server.calls
        # a stream, one message at a time: parked between messages, a task after a real wait
        mixed = channel.stream_stream("/t.T/Mixed")
        call = mixed(timeout=10)
        for word in (b"one", b"two", b"sleep", b"three", b"four"):
            await call.write(word)
            assert await call.read() == word.upper()
            tasked = word in (b"sleep", b"three", b"four")
            assert len(server.calls) == tasked, word  # parked (no task) until its first other wait
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        # the request stream read from a task the handler made
        reader = channel.stream_stream("/t.T/Reader")

        async def words() -> AsyncIterator[bytes]:
            for word in (b"a", b"b", b"c"):
                yield word

        assert [m async for m in reader(words(), timeout=10)] == [b"a|b|c"]
        # a parked stream the client cancels hears of it, and is forgotten
        parked = mixed(timeout=10)
        await parked.write(b"x")
        assert await parked.read() == b"X"
        parked.cancel()
        await asyncio.wait_for(probe.cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert not server.calls
        assert all(not connection.calls for connection in server.connections)

    run(body)


def test_health_check_and_watch() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

    run(body)


def test_a_call_the_client_gives_up_on_is_cancelled_on_the_server() -> None:
    async def body(server: grpc_h2c.Server, channel: grpc.aio.Channel, probe: Probe, _port: int) -> None:
        echo = unary(channel, "Echo")
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await echo(b"slow", timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(probe.cancelled.wait(), 5)
        assert await echo(b"next", timeout=5) == b"next"
        await asyncio.sleep(0.05)
        assert not server.calls  # finished and cancelled calls are all forgotten

    run(body)


def test_a_graceful_stop_finishes_calls_under_way_and_takes_no_new_ones() -> None:
    async def body(server: grpc_h2c.Server, channel: grpc.aio.Channel, probe: Probe, port: int) -> None:
        echo = unary(channel, "Echo")
        under_way = asyncio.ensure_future(echo(b"pause", timeout=10))
        await asyncio.wait_for(probe.started.wait(), 5)
        await server.stop(5)
        assert await under_way == b"pause"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    run(body)


def test_bytes_that_are_not_http2_close_that_connection_only() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n")  # fewer bytes than the preface: refused without waiting for more
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), 5)  # until the server closes
        writer.close()
        kinds, offset = [], 0
        while offset + 9 <= len(received):
            kinds.append(received[offset + 3])
            offset += 9 + int.from_bytes(received[offset : offset + 3], "big")
        assert kinds[0] == frames.SETTINGS  # it spoke first, as HTTP/2 servers do
        assert kinds[-1] == frames.GOAWAY
        # a frame larger than HTTP/2 allows without a SETTINGS raising the limit: FRAME_SIZE_ERROR
        raw = await Raw.connect(port)
        raw.send(frames.frame(frames.DATA, 0, 1, b"x" * (frames.MAX_FRAME + 1)))
        while (frame := await raw.frame())[0] != frames.GOAWAY:
            pass
        assert struct.unpack(">LL", frame[3])[1] == frames.FRAME_SIZE_ERROR
        raw.close()
        assert await unary(channel, "Echo")(b"fine", timeout=5) == b"fine"

    run(body)


# --- a raw HTTP/2 client: what grpcio's client never does on its own --------------------------


class Raw:
    """Frames in and out by hand over one connection, as a strict peer would send them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: bytes = b"") -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        raw.send(frames.PREFACE + frames.frame(frames.SETTINGS, 0, 0, settings))
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def call(self, stream: int, block: bytes, message: bytes) -> None:
        self.send(frames.frame(frames.HEADERS, frames.END_HEADERS, stream, block))
        framed = struct.pack(">BL", 0, len(message)) + message
        chunks = [framed[i : i + frames.MAX_FRAME] for i in range(0, len(framed), frames.MAX_FRAME)]
        for i, chunk in enumerate(chunks):
            self.send(frames.frame(frames.DATA, frames.END_STREAM if i == len(chunks) - 1 else 0, stream, chunk))

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF, payload

    async def answer(self, stream: int) -> tuple[bytes, dict[str, str]]:
        """The stream's DATA and its trailers; other frames are skipped."""
        data, trailers = b"", {}
        while True:
            kind, flags, on, payload = await self.frame()
            if on != stream:
                continue
            if kind == frames.DATA:
                data += payload
            elif kind == frames.HEADERS:
                fields = _decoded(self.decoder, payload)
                if flags & frames.END_STREAM:
                    trailers = {k: v for k, v in fields.items() if k.startswith("grpc-")}
            if flags & frames.END_STREAM:
                return data[5:], trailers

    def close(self) -> None:
        self.writer.close()


def literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal with incremental indexing: it enters the dynamic table at index 62."""
    return b"\x40" + frames.integer(len(name), 7) + name + frames.integer(len(value), 7) + value


POST_HTTP = b"\x83\x86"  # :method POST, :scheme http (static table)
GRPC = b"\x0f\x10" + frames.integer(16, 7) + b"application/grpc"  # content-type (static name 31), not indexed


def request(path: bytes, *fields: bytes) -> bytes:
    """A gRPC request's header block: pseudo-headers first, then content-type and ``fields``."""
    return POST_HTTP + literal(b":path", path) + GRPC + b"".join(fields)


def test_a_repeated_header_block_is_read_anew_when_the_table_has_changed() -> None:
    async def body(_server: Any, _channel: Any, _probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)

        async def meta(stream: int, block: bytes) -> Any:
            raw.call(stream, POST_HTTP + block + GRPC, b"r")
            data, trailers = await raw.answer(stream)
            assert trailers["grpc-status"] == "0"
            return json.loads(data)["metadata"]

        path = literal(b":path", b"/t.T/Meta")
        # The path enters the table, then x-n: a: x-n at 62, the path at 63.
        assert await meta(1, path + literal(b"x-n", b"a")) == [["x-n", "a"]]
        assert await meta(3, b"\xbf\xbe") == [["x-n", "a"]]  # the same, all indexed
        # The path again, then x-n: b: the very same indexes now mean x-n: b.
        assert await meta(5, path + literal(b"x-n", b"b")) == [["x-n", "b"]]
        assert await meta(7, b"\xbf\xbe") == [["x-n", "b"]]
        raw.close()

    run(body)


def test_answers_never_outrun_the_window_the_client_grants() -> None:
    async def body(_server: Any, _channel: Any, _probe: Probe, port: int) -> None:
        window = 1_000
        raw = await Raw.connect(port, struct.pack(">HL", frames.SETTINGS_INITIAL_WINDOW_SIZE, window))
        payload = bytes(range(256)) * 200  # 51,200 bytes: 52 windows
        raw.call(1, request(b"/t.T/Echo"), payload)
        granted, received, data = window, 0, b""
        while True:
            kind, flags, stream, frame = await raw.frame()
            if stream != 1:
                continue
            if kind == frames.DATA:
                received += len(frame)
                data += frame
                assert received <= granted, "the server sent past the stream's window"
                if received == granted:
                    granted += window
                    raw.send(frames.frame(frames.WINDOW_UPDATE, 0, 1, struct.pack(">L", window)))
                    raw.send(frames.frame(frames.WINDOW_UPDATE, 0, 0, struct.pack(">L", window)))
            if flags & frames.END_STREAM:
                break
        assert data[5:] == payload
        raw.close()

    run(body)


def test_padding_priority_and_continuation_frames_are_read_as_the_spec_lays_them_out() -> None:
    async def body(_server: Any, _channel: Any, _probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)
        block = request(b"/t.T/Echo") + literal(b"x-pad", b"y" * 40)
        first, rest = block[:7], block[7:]
        flags = frames.PADDED | frames.PRIORITY_FLAG  # no END_HEADERS: a CONTINUATION follows
        priority = struct.pack(">LB", 0, 15)  # stream dependency, weight
        raw.send(frames.frame(frames.HEADERS, flags, 1, b"\x03" + priority + first + b"\0\0\0"))
        raw.send(frames.frame(frames.CONTINUATION, frames.END_HEADERS, 1, rest))
        message = struct.pack(">BL", 0, 5) + b"hello"
        padded = frames.PADDED | frames.END_STREAM
        raw.send(frames.frame(frames.DATA, padded, 1, b"\x04" + message + b"\0\0\0\0"))
        data, trailers = await raw.answer(1)
        assert (data, trailers["grpc-status"]) == (b"hello", "0")
        raw.close()

    run(body)


async def goaway_code(raw: Raw) -> int:
    """Read until the server's GOAWAY: its error code."""
    while True:
        kind, _flags, _stream, payload = await raw.frame()
        if kind == frames.GOAWAY:
            return int(struct.unpack(">LL", payload[:8])[1])


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        pytest.param(lambda: [(frames.HEADERS, frames.PADDED | frames.END_HEADERS, 1, b"")], 0x1, id="empty-padded"),
        pytest.param(lambda: [(frames.WINDOW_UPDATE, 0, 0, b"\0\0\1")], 0x6, id="short-window-update"),
        pytest.param(lambda: [(frames.WINDOW_UPDATE, 0, 0, b"\0\0\0\0")], 0x1, id="zero-increment"),
        pytest.param(lambda: [(frames.PING, 0, 0, b"1234")], 0x6, id="short-ping"),
        pytest.param(lambda: [(frames.SETTINGS, 0, 0, struct.pack(">HL", 0x5, 0))], 0x1, id="max-frame-size-0"),
        pytest.param(
            lambda: (
                [(frames.HEADERS, 0, 1, POST_HTTP)] + [(frames.CONTINUATION, 0, 1, b"\x80" * 16_000)] * 6
            ),  # never END_HEADERS
            0x1,
            id="continuation-flood",
        ),
        pytest.param(
            lambda: (
                [(frames.HEADERS, frames.END_HEADERS, 1, request(b"/t.T/Hold"))]
                + [(frames.DATA, 0, 1, struct.pack(">BL", 0, 15_995) + b"x" * 15_995)]
                * (limits.STREAM_WINDOW // 16_000 + 2)
            ),  # past the window: the handler reads nothing, so none of it is given back
            0x3,
            id="past-the-stream-window",
        ),
    ],
)
def test_a_peer_that_breaks_http2_gets_a_goaway_with_the_reason_and_others_are_served(
    sent: Callable[[], list[tuple[int, int, int, bytes]]], code: int
) -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, port: int) -> None:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        raw = await Raw.connect(port)
        for kind, flags, stream, payload in sent():
            raw.send(frames.frame(kind, flags, stream, payload))
        assert await asyncio.wait_for(goaway_code(raw), 10) == code
        raw.close()
        assert await unary(channel, "Echo")(b"fine", timeout=5) == b"fine"
        assert errors == []  # nothing escaped into the event loop

    run(body)


def test_a_unary_call_with_two_messages_is_refused_at_the_second() -> None:
    async def body(_server: Any, _channel: Any, _probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)
        raw.send(frames.frame(frames.HEADERS, frames.END_HEADERS, 1, request(b"/t.T/Echo")))
        two = struct.pack(">BL", 0, 1) + b"a" + struct.pack(">BL", 0, 1) + b"b"
        raw.send(frames.frame(frames.DATA, 0, 1, two))  # no END_STREAM: it could go on forever
        _data, trailers = await raw.answer(1)
        assert trailers == {"grpc-status": "13", "grpc-message": "a unary call takes one request message"}
        raw.close()

    run(body)


def test_details_are_cut_to_fit_one_frame_and_made_utf8_so_the_status_always_goes_out() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        for request, details in ((b"verbose", "%" * limits.MAX_DETAILS), (b"surrogate", "bad: ?")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await unary(channel, "Echo")(request, timeout=5)
            assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
        assert await unary(channel, "Echo")(b"after", timeout=5) == b"after"

    run(body)


def test_a_graceful_stop_still_serves_calls_sent_before_the_client_saw_it_and_closes_cleanly() -> None:
    async def body(server: grpc_h2c.Server, _channel: Any, _probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)
        raw.call(1, request(b"/t.T/Echo"), b"one")
        assert (await raw.answer(1))[0] == b"one"
        stopping = asyncio.ensure_future(server.stop(5))
        notice = await asyncio.wait_for(goaway_frame(raw), 5)
        assert notice == (2**31 - 1, 0)  # "stop opening streams": those in flight are still served
        raw.call(3, request(b"/t.T/Echo"), b"two")  # sent meanwhile
        assert (await raw.answer(3))[0] == b"two"
        assert await asyncio.wait_for(goaway_frame(raw), 5) == (3, 0)
        assert await asyncio.wait_for(raw.reader.read(), 5) == b""  # a clean end, not a reset
        await stopping
        raw.close()

    run(body)


async def goaway_frame(raw: Raw) -> tuple[int, int]:
    while True:
        kind, _flags, _stream, payload = await raw.frame()
        if kind == frames.GOAWAY:
            last, code = struct.unpack(">LL", payload[:8])
            return int(last), int(code)


def test_a_call_reset_in_the_same_read_as_its_request_still_hears_of_it() -> None:
    async def body(server: grpc_h2c.Server, _channel: Any, probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)
        head = frames.frame(frames.HEADERS, frames.END_HEADERS, 1, request(b"/t.T/Echo"))
        data = frames.frame(frames.DATA, frames.END_STREAM, 1, struct.pack(">BL", 0, 4) + b"slow")
        reset = frames.frame(frames.RST_STREAM, 0, 1, struct.pack(">L", frames.NO_ERROR))
        raw.send(head + data + reset)  # it starts at once, then is reset before its task ever ran
        await asyncio.wait_for(probe.cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert not server.calls
        raw.close()

    run(body)


def test_a_stop_cancels_a_stream_waiting_for_its_next_message_and_says_why() -> None:
    async def body(server: grpc_h2c.Server, channel: grpc.aio.Channel, probe: Probe, _port: int) -> None:
        call = channel.stream_stream("/t.T/Mixed")(timeout=10)
        await call.write(b"x")
        assert await call.read() == b"X"  # now parked: no task
        await server.stop(0.2)
        await asyncio.wait_for(probe.cancelled.wait(), 5)
        with pytest.raises(grpc.aio.AioRpcError) as stopped:
            await call.read()
        assert (stopped.value.code(), stopped.value.details()) == (grpc.StatusCode.CANCELLED, "server stopping")

    run(body)


def test_a_stream_the_client_ended_gets_no_reset_after_its_answer() -> None:
    async def body(_server: Any, _channel: Any, _probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)
        raw.call(1, request(b"/t.T/First"), b"a")  # DATA with END_STREAM
        data, trailers = await raw.answer(1)
        assert (data, trailers["grpc-status"]) == (b"A", "0")
        raw.send(frames.frame(frames.PING, 0, 0, b"12345678"))
        while (frame := await raw.frame())[0] != frames.PING:
            assert frame[0] != frames.RST_STREAM, "a reset after the stream had ended both ways"
        raw.close()

    run(body)


def test_an_error_of_ours_past_the_handler_resets_that_call_only(monkeypatch: pytest.MonkeyPatch) -> None:
    real = frames.trailers

    def broken(code: int, details: str) -> bytes:
        if details == "trip":
            raise RuntimeError("a bug in the server itself")
        return real(code, details)

    monkeypatch.setattr(frames, "trailers", broken)

    async def body(server: grpc_h2c.Server, channel: grpc.aio.Channel, _probe: Probe, _port: int) -> None:
        for method in ("Abort", "SlowAbort"):  # at once, and from a task (after a wait)
            with pytest.raises(grpc.aio.AioRpcError) as reset:
                await unary(channel, method)(b"trip", timeout=5)
            assert reset.value.code() == grpc.StatusCode.INTERNAL  # RST_STREAM(INTERNAL_ERROR)
            assert await unary(channel, "Echo")(b"same connection", timeout=5) == b"same connection"
        await asyncio.sleep(0.05)
        assert not server.calls
        assert all(not connection.calls for connection in server.connections)

    run(body)


def test_grpc_timeout_sets_the_deadline_and_a_call_past_it_ends_deadline_exceeded() -> None:
    async def body(_server: Any, channel: grpc.aio.Channel, _probe: Probe, port: int) -> None:
        remaining = float(await unary(channel, "Remaining")(b"now", timeout=30))
        assert 20 < remaining <= 31  # grpcio sends grpc-timeout (rounded up); time_remaining() reads it
        assert await unary(channel, "Remaining")(b"now") == b"None"  # no deadline
        raw = await Raw.connect(port)
        deadline = literal(b"grpc-timeout", b"200m")
        raw.call(1, request(b"/t.T/Remaining", deadline), b"wait")  # its handler waits in a task
        # a stream parked for its next message (no END_STREAM), and one still waiting for its request
        raw.send(frames.frame(frames.HEADERS, frames.END_HEADERS, 3, request(b"/t.T/Chat", deadline)))
        raw.send(frames.frame(frames.DATA, 0, 3, struct.pack(">BL", 0, 1) + b"a"))
        ended: dict[int, dict[str, str]] = {}
        while len(ended) < 2:  # both end at about the same time: read them as they come
            kind, flags, stream, payload = await raw.frame()
            if kind == frames.HEADERS and flags & frames.END_STREAM:
                ended[stream] = {k: v for k, v in _decoded(raw.decoder, payload).items() if k.startswith("grpc-")}
            elif kind == frames.HEADERS:
                raw.decoder.decode(payload)
        exceeded = {"grpc-status": "4", "grpc-message": "deadline exceeded"}
        assert ended == {1: exceeded, 3: exceeded}
        raw.close()

    run(body)


def test_a_request_that_is_not_grpc_is_answered_415() -> None:
    async def body(_server: Any, _channel: Any, _probe: Probe, port: int) -> None:
        raw = await Raw.connect(port)
        block = POST_HTTP + literal(b":path", b"/t.T/Echo") + literal(b"content-type", b"text/plain")
        raw.send(frames.frame(frames.HEADERS, frames.END_HEADERS | frames.END_STREAM, 1, block))
        kind, flags, _stream, payload = await raw.frame()
        while kind != frames.HEADERS:
            kind, flags, _stream, payload = await raw.frame()
        fields = _decoded(raw.decoder, payload)
        assert (fields[":status"], fields["grpc-status"]) == ("415", "13")
        assert flags & frames.END_STREAM
        raw.close()

    run(body)
