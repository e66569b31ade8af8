"""The sans-I/O HTTP/2 core (``sidegate.grpc_h2c.connection``) driven byte by byte: conformance
with RFC 9113 and RFC 7541 where they bind a server (each case names its section), the gRPC over
HTTP/2 rules, and the limits. No sockets: frames from ``h2_factory`` in, frames and events out."""

from __future__ import annotations

import struct

import hpack
import pytest

from sidegate.grpc_h2c import frames, headers
from sidegate.grpc_h2c.calls import Call
from sidegate.grpc_h2c.frames import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PRIORITY,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_TIMEOUT,
    STREAM_CLOSED,
    WINDOW_UPDATE,
)
from sidegate.grpc_h2c.limits import Budget, Limits
from sidegate.grpc_h2c.streams import CLOSED, HALF_CLOSED_REMOTE, OPEN, InvalidTransition, Stream
from sidegate.settings import Settings
from tests.unit.h2_factory import Harness, Sent, message, request_headers


def started(limits: Limits | None = None, *, answer: bool = False) -> Harness:
    harness = Harness(limits, answer=answer)
    sent = harness.start()
    assert [s.kind for s in sent] == [SETTINGS]  # our ACK of theirs
    return harness


def kinds(sent: list[Sent]) -> list[int]:
    return [s.kind for s in sent]


def rst(sent: list[Sent], stream: int) -> int:
    found = [s for s in sent if s.kind == RST_STREAM and s.stream == stream]
    assert found, sent
    return found[0].code


def goaway(harness: Harness, sent: list[Sent]) -> int:
    found = [s for s in sent if s.kind == GOAWAY]
    assert found, sent
    assert harness.conn.terminated == found[-1].code
    return found[-1].code


# -- §3.4 the preface, §6.5 SETTINGS first ------------------------------------------------


def test_3_4_a_preface_that_is_not_http2_ends_the_connection_at_once() -> None:
    harness = Harness()
    assert goaway(harness, harness.feed(b"GET / HTTP/1.1\r\n")) == PROTOCOL_ERROR


def test_3_4_the_first_frame_after_the_preface_must_be_settings() -> None:
    harness = Harness()
    sent = harness.feed(frames.PREFACE + frames.frame(PING, 0, 0, b"12345678"))
    assert goaway(harness, sent) == PROTOCOL_ERROR
    harness = Harness()
    sent = harness.feed(frames.PREFACE + harness.client.call(1))
    assert goaway(harness, sent) == PROTOCOL_ERROR


def test_3_4_a_preface_or_settings_that_never_comes_times_out() -> None:
    harness = Harness(Limits(preface_timeout=10))
    harness.feed(frames.PREFACE[:10])
    harness.conn.tick(5.0)
    assert harness.conn.terminated is None
    harness.conn.tick(11.0)
    assert goaway(harness, harness.take()) == SETTINGS_TIMEOUT


def test_our_settings_advertise_the_limits() -> None:
    harness = Harness.__new__(Harness)
    Harness.__init__(harness)
    harness.conn.out.clear()
    harness.conn.initiate()
    settings = harness.take()[0]
    pairs = dict(struct.iter_unpack(">HL", settings.payload))
    limits = Limits()
    assert pairs[frames.SETTINGS_MAX_CONCURRENT_STREAMS] == limits.max_concurrent_streams == 100
    assert pairs[frames.SETTINGS_MAX_HEADER_LIST_SIZE] == limits.max_header_list_size == 16 << 10
    assert pairs[frames.SETTINGS_INITIAL_WINDOW_SIZE] == limits.stream_window
    assert pairs[frames.SETTINGS_ENABLE_PUSH] == 0


# -- a call, the happy path ------------------------------------------------------------------


def test_a_unary_call_is_heard_and_answered_and_its_stream_closes() -> None:
    harness = started(answer=True)
    sent = harness.feed(harness.client.call(1, b"hello"))
    assert harness.events == [("request", 1, "/t.T/Echo", False), ("data", 1, (b"hello",), True)]
    assert kinds(sent) == [HEADERS, DATA, HEADERS]
    assert sent[1].payload == message(b"hello")
    assert sent[2].flags & END_STREAM
    assert harness.conn.streams == {}
    assert harness.conn.held == 0
    assert harness.budget.held == 0


def test_a_message_split_over_frames_is_handed_over_whole() -> None:
    harness = started()
    framed = message(b"x" * 40_000)
    chunks = [framed[i : i + 16_000] for i in range(0, len(framed), 16_000)]
    harness.feed(harness.client.headers(1))
    for chunk in chunks[:-1]:
        harness.feed(harness.client.data(1, chunk))
    assert harness.events == [("request", 1, "/t.T/Echo", False)]
    harness.feed(harness.client.data(1, chunks[-1], end_stream=True))
    assert harness.events[-1] == ("data", 1, (b"x" * 40_000,), True)


# -- §5.1 stream states ----------------------------------------------------------------------


def test_5_1_the_state_table_refuses_transitions_it_does_not_list() -> None:
    stream = Stream(None, 1)
    assert stream.state == OPEN
    stream.transition(1)  # RECV_END_STREAM
    assert stream.state == HALF_CLOSED_REMOTE
    with pytest.raises(InvalidTransition):
        stream.transition(1)
    stream.transition(2)  # SEND_END_STREAM
    assert stream.state == CLOSED


def test_5_1_data_on_an_idle_stream_is_a_connection_error() -> None:
    harness = started()
    assert goaway(harness, harness.feed(harness.client.data(1, message(b"x")))) == PROTOCOL_ERROR


def test_5_1_rst_stream_on_an_idle_stream_is_a_connection_error() -> None:
    harness = started()
    sent = harness.feed(frames.rst_stream(3, CANCEL))
    assert goaway(harness, sent) == PROTOCOL_ERROR


def test_5_1_window_update_on_an_idle_stream_is_a_connection_error() -> None:
    harness = started()
    assert goaway(harness, harness.feed(frames.window_update(5, 10))) == PROTOCOL_ERROR


def test_5_1_priority_on_an_idle_stream_is_allowed() -> None:
    harness = started()
    sent = harness.feed(frames.frame(PRIORITY, 0, 9, struct.pack(">LB", 0, 16)))
    assert sent == []
    assert harness.conn.terminated is None


def test_5_1_data_after_end_stream_is_a_stream_error_stream_closed() -> None:
    harness = started()
    sent = harness.feed(harness.client.headers(1, end_stream=True) + harness.client.data(1, b"late"))
    assert rst(sent, 1) == STREAM_CLOSED
    assert harness.events[-1] == ("reset", 1)
    assert harness.conn.terminated is None


def test_5_1_headers_after_end_stream_is_a_stream_error_stream_closed() -> None:
    harness = started()
    harness.feed(harness.client.headers(1, end_stream=True))
    sent = harness.feed(harness.client.headers(1, [("x-trailer", "1")], end_stream=True))
    assert rst(sent, 1) == STREAM_CLOSED


def test_5_1_1_a_stream_id_lower_than_one_seen_is_a_connection_error() -> None:
    harness = started(answer=True)
    harness.feed(harness.client.call(5))
    sent = harness.feed(harness.client.call(3))
    assert goaway(harness, sent) == PROTOCOL_ERROR


def test_5_1_1_an_even_stream_id_from_a_client_is_a_connection_error() -> None:
    harness = started()
    assert goaway(harness, harness.feed(harness.client.headers(2))) == PROTOCOL_ERROR


def test_5_1_frames_in_flight_after_our_reset_are_ignored() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    stream = harness.conn.streams[1]
    harness.conn.reset_stream(stream, CANCEL)
    assert rst(harness.take(), 1) == CANCEL
    sent = harness.feed(harness.client.data(1, message(b"x")) + frames.window_update(1, 5))
    assert sent == []
    assert harness.conn.terminated is None


def test_5_1_data_on_a_closed_stream_we_did_not_reset_is_stream_closed() -> None:
    harness = started(answer=True)
    harness.feed(harness.client.call(1))
    sent = harness.feed(harness.client.data(1, b"more"))
    assert rst(sent, 1) == STREAM_CLOSED


def test_5_1_2_streams_past_the_concurrency_limit_are_refused() -> None:
    harness = started(Limits(max_concurrent_streams=2))
    sent = harness.feed(b"".join(harness.client.headers(i) for i in (1, 3, 5)))
    assert rst(sent, 5) == REFUSED_STREAM
    assert sorted(harness.conn.streams) == [1, 3]


def test_5_3_1_a_stream_that_depends_on_itself_is_a_stream_error() -> None:
    harness = started()
    sent = harness.feed(frames.frame(PRIORITY, 0, 7, struct.pack(">LB", 7, 16)))
    assert rst(sent, 7) == PROTOCOL_ERROR
    block = harness.client.block(request_headers())
    flags = END_HEADERS | frames.PRIORITY_FLAG
    sent = harness.feed(frames.frame(HEADERS, flags, 9, struct.pack(">LB", 9, 16) + block))
    assert rst(sent, 9) == PROTOCOL_ERROR
    assert harness.conn.terminated is None


# -- §6 frame definitions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(frames.frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR, id="6.1-data-on-stream-0"),
        pytest.param(frames.frame(HEADERS, END_HEADERS, 0, b"\x83"), PROTOCOL_ERROR, id="6.2-headers-on-stream-0"),
        pytest.param(frames.frame(PRIORITY, 0, 0, b"\0" * 5), PROTOCOL_ERROR, id="6.3-priority-on-stream-0"),
        pytest.param(frames.frame(RST_STREAM, 0, 0, b"\0" * 4), PROTOCOL_ERROR, id="6.4-rst-on-stream-0"),
        pytest.param(frames.frame(RST_STREAM, 0, 1, b"\0" * 3), FRAME_SIZE_ERROR, id="6.4-rst-not-4-bytes"),
        pytest.param(frames.frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR, id="6.5-settings-on-a-stream"),
        pytest.param(frames.frame(SETTINGS, 0, 0, b"\0" * 5), FRAME_SIZE_ERROR, id="6.5-settings-not-6n"),
        pytest.param(frames.frame(SETTINGS, 1, 0, b"\0" * 6), FRAME_SIZE_ERROR, id="6.5-settings-ack-with-payload"),
        pytest.param(frames.settings((0x2, 2)), PROTOCOL_ERROR, id="6.5.2-enable-push-2"),
        pytest.param(frames.settings((0x4, 2**31)), FLOW_CONTROL_ERROR, id="6.5.2-initial-window-too-large"),
        pytest.param(frames.settings((0x5, 16_383)), PROTOCOL_ERROR, id="6.5.2-max-frame-size-too-small"),
        pytest.param(frames.settings((0x5, 1 << 24)), PROTOCOL_ERROR, id="6.5.2-max-frame-size-too-large"),
        pytest.param(frames.frame(PUSH_PROMISE, 4, 1, b"\0" * 4), PROTOCOL_ERROR, id="6.6-push-promise-from-client"),
        pytest.param(frames.frame(PING, 0, 1, b"\0" * 8), PROTOCOL_ERROR, id="6.7-ping-on-a-stream"),
        pytest.param(frames.frame(PING, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR, id="6.7-ping-not-8-bytes"),
        pytest.param(frames.frame(GOAWAY, 0, 1, b"\0" * 8), PROTOCOL_ERROR, id="6.8-goaway-on-a-stream"),
        pytest.param(frames.frame(GOAWAY, 0, 0, b"\0" * 7), FRAME_SIZE_ERROR, id="6.8-goaway-short"),
        pytest.param(frames.frame(WINDOW_UPDATE, 0, 0, b"\0" * 3), FRAME_SIZE_ERROR, id="6.9-window-update-short"),
        pytest.param(frames.window_update(0, 0), PROTOCOL_ERROR, id="6.9-zero-increment-on-connection"),
        pytest.param(frames.window_update(0, 2**31 - 1), FLOW_CONTROL_ERROR, id="6.9.1-connection-window-overflow"),
        pytest.param(frames.frame(CONTINUATION, 4, 1, b"\x83"), PROTOCOL_ERROR, id="6.10-continuation-alone"),
        pytest.param(frames.frame(DATA, 0, 1, b"x" * 16_385), FRAME_SIZE_ERROR, id="4.2-frame-over-max-frame-size"),
    ],
)
def test_6_frames_that_break_their_definition_end_the_connection_with_its_code(frame: bytes, code: int) -> None:
    harness = started()
    assert goaway(harness, harness.feed(frame)) == code


def test_6_1_padding_longer_than_the_frame_is_a_connection_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    sent = harness.feed(frames.frame(DATA, frames.PADDED, 1, b"\x05abc"))
    assert goaway(harness, sent) == PROTOCOL_ERROR


def test_6_1_padding_is_given_back_at_once() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    before = harness.conn.recv_window + harness.conn.credit
    harness.feed(frames.frame(DATA, frames.PADDED, 1, b"\x0a" + message(b"x")[:3] + b"\0" * 10))
    assert harness.conn.recv_window + harness.conn.credit == before - 3  # the pad and its length byte back


def test_6_2_headers_interleaved_with_another_frame_is_a_connection_error() -> None:
    harness = started()
    block = harness.client.block(request_headers())
    sent = harness.feed(frames.frame(HEADERS, 0, 1, block[:5]) + frames.frame(PING, 0, 0, b"\0" * 8))
    assert goaway(harness, sent) == PROTOCOL_ERROR


def test_6_5_3_settings_are_acknowledged() -> None:
    harness = started()
    sent = harness.feed(frames.settings((0x1, 0)))
    assert [(s.kind, s.flags) for s in sent] == [(SETTINGS, 1)]


def test_6_5_unknown_settings_and_frame_types_are_ignored() -> None:
    harness = started()
    sent = harness.feed(frames.settings((0x99, 1)) + frames.frame(0x42, 0, 0, b"whatever"))
    assert [(s.kind, s.flags) for s in sent] == [(SETTINGS, 1)]
    assert harness.conn.terminated is None


def test_6_7_ping_is_answered_with_the_same_payload() -> None:
    harness = started()
    sent = harness.feed(frames.frame(PING, 0, 0, b"abcdefgh"))
    assert [(s.kind, s.flags, s.payload) for s in sent] == [(PING, 1, b"abcdefgh")]


def test_6_8_a_client_goaway_then_any_frame_changes_nothing_and_the_connection_finishes() -> None:
    harness = started(answer=True)
    harness.feed(harness.client.headers(1))
    harness.feed(frames.goaway(0, NO_ERROR))
    assert harness.conn.closing
    assert not harness.conn.finished
    harness.feed(harness.client.data(1, message(b"x"), end_stream=True) + frames.frame(PING, 0, 0, b"\0" * 8))
    assert harness.conn.finished


def test_6_9_a_zero_increment_on_a_stream_is_a_stream_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    assert rst(harness.feed(frames.window_update(1, 0)), 1) == PROTOCOL_ERROR


def test_6_9_1_a_stream_window_past_2_31_is_a_stream_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    assert rst(harness.feed(frames.window_update(1, 2**31 - 1)), 1) == FLOW_CONTROL_ERROR


def test_6_9_1_data_past_the_stream_window_is_a_flow_control_error() -> None:
    harness = started(Limits(stream_window=100))
    harness.feed(harness.client.headers(1))
    assert goaway(harness, harness.feed(harness.client.data(1, b"x" * 101))) == FLOW_CONTROL_ERROR


def test_6_9_2_initial_window_size_that_overflows_a_stream_window_is_a_connection_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1) + frames.window_update(1, 2**31 - 1 - 65_535))
    sent = harness.feed(frames.settings((0x4, 65_536)))
    assert goaway(harness, sent) == FLOW_CONTROL_ERROR


def test_6_9_2_a_smaller_initial_window_holds_answers_back_and_a_larger_one_lets_them_out() -> None:
    harness = started()
    harness.feed(frames.settings((0x4, 0)))
    harness.feed(harness.client.headers(1, end_stream=True))
    stream = harness.conn.streams[1]
    harness.conn.send_data(stream, message(b"a" * 100))
    assert kinds(harness.take()) == [HEADERS]  # the data waits for window
    sent = harness.feed(frames.settings((0x4, 1000)))
    assert [s.kind for s in sent if s.kind == DATA] == [DATA]


# -- §5.2 flow control both ways -------------------------------------------------------------


def test_5_2_credit_comes_back_only_as_the_handler_consumes() -> None:
    limits = Limits()
    harness = started(limits)
    harness.feed(harness.client.headers(1))
    big = message(b"y" * 16_000)
    for _ in range(200):  # 3.2 MB, no handler reading: the Recorder consumes on delivery...
        harness.conn.receive(harness.client.data(1, big))
    updates = [s for s in harness.take() if s.kind == WINDOW_UPDATE]
    assert updates  # ... so credit came back
    unread = started(limits)
    unread.listener.data = lambda *args: 0  # type: ignore[method-assign]  # a handler that never reads
    unread.feed(unread.client.headers(1))
    for _ in range(200):
        unread.conn.receive(unread.client.data(1, big))
    assert [s for s in unread.take() if s.kind == WINDOW_UPDATE] == []
    assert unread.conn.held == 200 * len(big) == unread.budget.held - unread.conn.streams[1].weight


def test_5_2_a_connection_window_resume_walks_only_what_it_sends() -> None:
    harness = started()
    harness.feed(frames.settings((0x4, 1 << 20)))
    conn = harness.conn
    for sid in range(1, 160, 2)[:80]:
        harness.feed(harness.client.headers(sid, end_stream=True))
        conn.send_data(conn.streams[sid], message(b"z" * 2_000))
    harness.take()
    assert len(conn.waiting) > 40  # shut out by the 64 KiB connection window
    waiting = len(conn.waiting)
    harness.feed(frames.window_update(0, 2_005))
    assert len(conn.waiting) >= waiting - 2  # one stream's worth opened: one or two streams served


# -- §8 headers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([*request_headers(), ("X-Upper", "1")], id="8.2.1-uppercase-name"),
        pytest.param([*request_headers(), ("connection", "close")], id="8.2.2-connection"),
        pytest.param([*request_headers(), ("transfer-encoding", "chunked")], id="8.2.2-transfer-encoding"),
        pytest.param([*request_headers(), ("upgrade", "h2c")], id="8.2.2-upgrade"),
        pytest.param([*request_headers(), ("keep-alive", "1")], id="8.2.2-keep-alive"),
        pytest.param([*(f for f in request_headers() if f[0] != "te"), ("te", "gzip")], id="8.2.2-te-not-trailers"),
        pytest.param([*request_headers(), (":path", "/again")], id="8.3-pseudo-after-regular"),
        pytest.param([request_headers()[0], *request_headers()], id="8.3-duplicate-method"),
        pytest.param([(":status", "200"), *request_headers()], id="8.3-response-pseudo-in-request"),
        pytest.param([(":protocol", "x"), *request_headers()], id="8.3-unknown-pseudo"),
        pytest.param([(k, v) for k, v in request_headers() if k != ":path"], id="8.3.1-no-path"),
        pytest.param([(k, v) for k, v in request_headers() if k != ":scheme"], id="8.3.1-no-scheme"),
        pytest.param([(k, v) for k, v in request_headers() if k != ":method"], id="8.3.1-no-method"),
        pytest.param([*request_headers(), ("x-a", "a\r\nb")], id="8.2.1-crlf-in-value"),
        pytest.param([*request_headers(), ("x-a", "a\0b")], id="8.2.1-nul-in-value"),
        pytest.param([*request_headers(), ("x-a", " padded")], id="8.2.1-leading-space"),
        pytest.param([*request_headers(), ("x a", "1")], id="8.2.1-space-in-name"),
        pytest.param([*request_headers(), ("content-length", "1"), ("content-length", "2")], id="8.1.1-two-lengths"),
    ],
)
def test_8_a_malformed_request_is_a_stream_error_and_the_connection_serves_on(fields: list[tuple[str, str]]) -> None:
    harness = started(answer=True)
    sent = harness.feed(harness.client.headers(1, fields))
    assert rst(sent, 1) == PROTOCOL_ERROR
    assert harness.events == []
    sent = harness.feed(harness.client.call(3, b"next"))
    assert [s.kind for s in sent] == [HEADERS, DATA, HEADERS]  # the HPACK table stayed in step


def test_8_1_1_content_length_that_disagrees_with_the_data_is_a_stream_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1, [*request_headers(), ("content-length", "3")]))
    assert rst(harness.feed(harness.client.data(1, b"abcd", end_stream=True)), 1) == PROTOCOL_ERROR


def test_8_1_trailers_without_end_stream_are_a_stream_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    assert rst(harness.feed(harness.client.headers(1, [("x-t", "1")])), 1) == PROTOCOL_ERROR


def test_8_1_trailers_with_a_pseudo_header_are_a_stream_error() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    assert rst(harness.feed(harness.client.headers(1, [(":path", "/x")], end_stream=True)), 1) == PROTOCOL_ERROR


def test_8_1_trailers_end_the_request() -> None:
    harness = started()
    harness.feed(harness.client.headers(1) + harness.client.data(1, message(b"m")))
    harness.feed(harness.client.headers(1, [("x-t", "1")], end_stream=True))
    assert harness.events[-1] == ("data", 1, (), True)


def refusal(sent: list[Sent]) -> dict[str, str]:
    assert next(s.kind for s in sent) == HEADERS
    assert sent[0].flags & END_STREAM
    return dict(hpack.Decoder().decode(sent[0].payload))


@pytest.mark.parametrize(
    ("fields", "status", "grpc_status"),
    [
        pytest.param(
            [(k, "text/plain" if k == "content-type" else v) for k, v in request_headers()], "415", "13", id="text"
        ),
        pytest.param([(k, v) for k, v in request_headers() if k != "content-type"], "415", "13", id="none"),
        pytest.param(
            [(k, "application/grpcx" if k == "content-type" else v) for k, v in request_headers()], "415", "13", id="x"
        ),
        pytest.param([(k, "GET" if k == ":method" else v) for k, v in request_headers()], "405", "13", id="get"),
        pytest.param([*request_headers(), ("grpc-timeout", "soon")], "400", "13", id="bad-timeout"),
        pytest.param([*request_headers(), ("grpc-encoding", "gzip")], "200", "12", id="gzip"),
        pytest.param([*request_headers(), ("x-big", "v" * 17_000)], "431", "13", id="431"),
    ],
)
def test_grpc_requests_it_refuses_get_an_http_status_and_a_grpc_status(
    fields: list[tuple[str, str]], status: str, grpc_status: str
) -> None:
    harness = started()
    answer = refusal(harness.feed(harness.client.headers(1, fields, end_stream=True)))
    assert (answer[":status"], answer["grpc-status"]) == (status, grpc_status)
    assert harness.events == []
    assert harness.conn.streams == {}


def test_grpc_content_types_with_a_suffix_are_grpc() -> None:
    for value in ("application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8"):
        harness = started()
        fields = [(k, value if k == "content-type" else v) for k, v in request_headers()]
        harness.feed(harness.client.headers(1, fields))
        assert harness.events == [("request", 1, "/t.T/Echo", False)], value


def test_grpc_a_compressed_message_without_grpc_encoding_is_internal() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    harness.feed(harness.client.data(1, struct.pack(">BL", 1, 2) + b"zz"))
    assert harness.events[-1] == ("fail", 1, 13, "compressed flag set without grpc-encoding")


def test_grpc_a_message_over_the_limit_is_refused_at_its_prefix() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    harness.feed(harness.client.data(1, struct.pack(">BL", 0, (4 << 20) + 1)))
    assert harness.events[-1][:3] == ("fail", 1, 8)


@pytest.mark.parametrize(
    ("value", "seconds"), [("5S", 5.0), ("100m", 0.1), ("2M", 120.0), ("1H", 3600.0), ("7u", 7e-6), ("9n", 9e-9)]
)
def test_grpc_timeout_units(value: str, seconds: float) -> None:
    head = headers.parse_request(
        [(k.encode(), v.encode()) for k, v in [*request_headers(), ("grpc-timeout", value)]], 16_384
    )
    assert head.timeout == pytest.approx(seconds)


# -- RFC 7541 --------------------------------------------------------------------------------


def test_7541_4_2_a_table_size_update_past_our_setting_is_a_compression_error() -> None:
    harness = started()
    block = b"\x3f\x81\x20" + harness.client.block(request_headers())  # size update to 4128 > 4096
    sent = harness.feed(frames.frame(HEADERS, END_HEADERS, 1, block))
    assert goaway(harness, sent) == COMPRESSION_ERROR


def test_7541_2_3_an_index_past_the_table_is_a_compression_error() -> None:
    harness = started()
    assert goaway(harness, harness.feed(frames.frame(HEADERS, END_HEADERS, 1, b"\xff\x00"))) == COMPRESSION_ERROR


def test_7541_a_repeated_block_is_read_anew_when_the_table_changed() -> None:
    harness = started()
    path = b"\x44" + frames.integer(9, 7) + b"/t.T/Meta"  # :path literal, indexed (62)
    grpc = b"\x0f\x10" + frames.integer(16, 7) + b"application/grpc"
    harness.feed(frames.frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x83\x86" + path + grpc))
    harness.feed(frames.frame(HEADERS, END_HEADERS | END_STREAM, 3, b"\x83\x86\xbe" + grpc))
    other = b"\x44" + frames.integer(9, 7) + b"/t.T/Else"
    harness.feed(frames.frame(HEADERS, END_HEADERS | END_STREAM, 5, b"\x83\x86" + other + grpc))
    harness.feed(frames.frame(HEADERS, END_HEADERS | END_STREAM, 7, b"\x83\x86\xbe" + grpc))
    paths = [event[2] for event in harness.events if event[0] == "request"]
    assert paths == ["/t.T/Meta", "/t.T/Meta", "/t.T/Else", "/t.T/Else"]


def test_7541_a_header_list_over_the_hard_bound_ends_the_connection() -> None:
    harness = started()
    fields = [*request_headers(), *[("x-a", "v" * 100)] * 400]  # ~54 KB decoded from ~1 KB: indexed
    sent = harness.feed(harness.client.headers(1, fields))
    assert goaway(harness, sent) == COMPRESSION_ERROR


# -- abuse counters --------------------------------------------------------------------------


def test_rapid_reset_ends_in_enhance_your_calm() -> None:
    harness = started(Limits(premature_reset_min_streams=100))
    client = harness.client
    sent: list[Sent] = []
    for sid in range(1, 2_000, 2):
        sent += harness.feed(client.headers(sid) + frames.rst_stream(sid, CANCEL))
        if harness.conn.terminated is not None:
            break
    assert goaway(harness, sent) == ENHANCE_YOUR_CALM
    assert harness.conn.opened <= 102


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(frames.frame(PING, 0, 0, b"\0" * 8), id="ping"),
        pytest.param(frames.settings(), id="settings"),
        pytest.param(frames.frame(PRIORITY, 0, 3, struct.pack(">LB", 0, 1)), id="priority"),
        pytest.param(frames.window_update(0, 1), id="window-update"),
        pytest.param(frames.frame(0x42, 0, 0, b""), id="unknown-type"),
    ],
)
def test_control_frame_floods_end_in_enhance_your_calm(flood: bytes) -> None:
    harness = started()
    sent: list[Sent] = []
    for _ in range(20):
        sent += harness.feed(flood * 100)
    assert goaway(harness, sent) == ENHANCE_YOUR_CALM


def test_control_frames_at_a_modest_rate_are_fine() -> None:
    harness = started()
    for second in range(60):
        harness.feed(frames.frame(PING, 0, 0, b"\0" * 8) * 200)
        harness.conn.tick(float(second))
    assert harness.conn.terminated is None


def test_empty_data_and_continuation_floods_end_in_enhance_your_calm() -> None:
    harness = started()
    harness.feed(harness.client.headers(1))
    assert goaway(harness, harness.feed(frames.frame(DATA, 0, 1, b"") * 20)) == ENHANCE_YOUR_CALM
    harness = started()
    block = harness.client.block(request_headers())
    flood = frames.frame(HEADERS, 0, 1, block) + frames.frame(CONTINUATION, 0, 1, b"") * 20
    assert goaway(harness, harness.feed(flood)) == ENHANCE_YOUR_CALM


def test_refused_stream_floods_end_in_enhance_your_calm() -> None:
    harness = started(Limits(max_concurrent_streams=1, max_refused_streams=10))
    sent = harness.feed(b"".join(harness.client.headers(i) for i in range(1, 40, 2)))
    assert goaway(harness, sent) == ENHANCE_YOUR_CALM


# -- time ------------------------------------------------------------------------------------


def test_an_idle_connection_gets_a_graceful_goaway() -> None:
    harness = started(Limits(idle_timeout=30))
    harness.conn.tick(10.0)
    assert harness.take() == []
    harness.conn.tick(31.0)
    assert [(s.kind, s.code) for s in harness.take()] == [(GOAWAY, NO_ERROR)]
    assert harness.conn.finished


def test_an_idle_stream_and_a_flow_blocked_stream_are_reset() -> None:
    harness = started(Limits(stream_idle_timeout=20, flow_blocked_timeout=40))
    harness.feed(frames.settings((0x4, 0)))
    harness.feed(harness.client.headers(1) + harness.client.headers(3, end_stream=True))
    harness.conn.send_data(harness.conn.streams[3], message(b"blocked"))
    harness.take()
    harness.conn.tick(21.0)
    assert [(s.stream, s.code) for s in harness.take() if s.kind == RST_STREAM] == [(1, CANCEL)]
    harness.conn.tick(42.0)
    assert [(s.stream, s.code) for s in harness.take() if s.kind == RST_STREAM] == [(3, CANCEL)]
    assert ("reset", 1) in harness.events
    assert ("reset", 3) in harness.events


def test_an_old_connection_goes_away_gracefully_then_cancels_what_is_left() -> None:
    harness = started(Limits(max_connection_age=100, max_connection_age_grace=10, idle_timeout=1e9))
    harness.feed(harness.client.headers(1))
    harness.conn.tick(101.0)
    assert [(s.kind, s.payload[:4]) for s in harness.take()] == [(GOAWAY, b"\x7f\xff\xff\xff")]
    harness.conn.tick(102.0)
    assert [(s.kind, s.payload[:4]) for s in harness.take()] == [(GOAWAY, b"\0\0\0\1")]
    harness.conn.tick(112.0)
    assert rst(harness.take(), 1) == CANCEL
    assert harness.conn.finished


def test_a_call_sets_every_field_a_stream_has() -> None:
    stream, call = Stream(None, 1), Call(None, 1)
    for name in Stream.__slots__:
        assert getattr(call, name) == getattr(stream, name), name


def test_the_limits_an_operator_tunes_are_settings() -> None:
    environ = {
        "SIDEGATE_GRPC_MAX_CONNECTIONS": "7",
        "SIDEGATE_GRPC_IDLE_TIMEOUT": "30",
        "SIDEGATE_GRPC_MAX_CONNECTION_AGE": "600",
    }
    settings = Settings.from_env(environ)
    assert (settings.grpc_max_connections, settings.grpc_idle_timeout, settings.grpc_max_connection_age) == (7, 30, 600)
    defaults = Settings.from_env({})
    limits = Limits()
    assert defaults.grpc_max_connections == limits.max_connections
    assert defaults.grpc_idle_timeout == limits.idle_timeout
    assert defaults.grpc_max_connection_age == limits.max_connection_age


def test_over_the_worker_budget_a_connection_holding_more_than_its_share_opens_no_stream() -> None:
    limits = Limits(worker_buffer=100_000, fair_share=10_000)
    budget = Budget(limits.worker_buffer)
    greedy, modest = Harness(limits, budget=budget), Harness(limits, budget=budget)
    for harness in (greedy, modest):
        harness.start()
    greedy.listener.data = lambda *args: 0  # type: ignore[method-assign]  # a handler that never reads
    greedy.feed(greedy.client.headers(1))
    for _ in range(8):
        greedy.feed(greedy.client.data(1, message(b"g" * 16_000)))
    assert budget.held > limits.worker_buffer
    assert rst(greedy.feed(greedy.client.headers(3)), 3) == REFUSED_STREAM
    assert greedy.conn.refused == 0  # refused for the worker's sake: not counted against the peer
    assert modest.feed(modest.client.headers(1)) == []  # holding nothing, it is served
    assert 1 in modest.conn.streams
    greedy.feed(frames.rst_stream(1, CANCEL))  # what the greedy stream held goes back
    assert budget.held == modest.conn.streams[1].weight


def test_a_connection_is_idle_from_when_its_last_stream_ended() -> None:
    harness = started(Limits(idle_timeout=30, stream_idle_timeout=1e9))
    harness.feed(harness.client.headers(1, end_stream=True))  # a long call: no frame for a while
    harness.conn.tick(100.0)
    stream = harness.conn.streams[1]
    harness.conn.send_trailers(stream, frames.OK_TRAILERS)
    harness.take()
    harness.conn.tick(120.0)
    assert harness.take() == []  # 20 s idle, not 120
    harness.conn.tick(131.0)
    assert [(s.kind, s.code) for s in harness.take()] == [(GOAWAY, NO_ERROR)]
