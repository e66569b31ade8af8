"""The attacks of issue 15, each against a fresh ``grpc_h2c`` server in its own process: while
the attack runs, a second client's gRPC health checks keep being answered, the server's RSS
stays under ``RSS_BOUND`` above where it started, and the attacker gets the GOAWAY or RST_STREAM
code that names what it did. Traffic goes to 127.0.0.1 only; every attack is bounded in frames
and seconds and stops by itself. The README's security section has the table these produce."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.frames import (
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    GOAWAY,
    HEADERS,
    NO_ERROR,
    PING,
    PRIORITY,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS_TIMEOUT,
)
from tests.unit.h2_factory import Client, message, request_headers

ROOT = Path(__file__).resolve().parents[2]
RSS_BOUND = 120 << 20  # growth over the idle server's RSS while attacked; the old server grew 584 MB
LIMITS = {"preface_timeout": 2.0, "idle_timeout": 2.0, "stream_idle_timeout": 3.0, "tick": 0.2, "max_connections": 48}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Watch:
    """Health checks from a second client, and the server's RSS, sampled until stopped."""

    port: int
    pid: int
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    peak: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stop.is_set():
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    self.answered += 1
                except grpc.RpcError as error:
                    self.failures.append(str(error.code()))
                self.peak = max(self.peak, rss(self.pid))
                self.stop.wait(0.05)


@dataclass
class Server:
    port: int
    process: subprocess.Popen[str]
    baseline: int


@pytest.fixture
def server() -> Iterator[Server]:
    argv = [sys.executable, "-m", "tests.integration.h2_attack_server", json.dumps(LIMITS)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        time.sleep(0.2)
        yield Server(port, process, rss(process.pid))
    finally:
        process.terminate()
        try:
            _out, err = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, err = process.communicate()
        assert "Traceback" not in err, err[-3000:]
        assert "EVENT LOOP EXCEPTION" not in err, err[-3000:]
        assert "write_eof" not in err, err[-3000:]


class Attacker:
    """One raw connection: sends until told to stop or the server closes; reads every frame."""

    def __init__(self, port: int, preface: bytes | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.client = Client()
        self.goaway: int | None = None
        self.resets: dict[int, int] = {}
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()
        if preface is not None:
            self.send(preface)

    def read(self) -> None:
        buffer = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                buffer += chunk
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, stream, payload = buffer[3], int.from_bytes(buffer[5:9], "big"), buffer[9 : 9 + length]
                    buffer = buffer[9 + length :]
                    if kind == GOAWAY and self.goaway is None:
                        self.goaway = int(struct.unpack_from(">L", payload, 4)[0])
                    elif kind == RST_STREAM:
                        self.resets[stream] = int(struct.unpack(">L", payload)[0])
        except OSError:
            pass
        self.closed.set()

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def flood(self, frame: bytes, count: int, batch: int = 1000) -> None:
        """``count`` copies of ``frame``, in batches, until the server ends the connection."""
        for _ in range(count // batch):
            if self.goaway is not None or not self.send(frame * batch):
                return

    def ended(self, seconds: float = 15) -> int | None:
        self.closed.wait(seconds)
        return self.goaway

    def close(self) -> None:
        self.sock.close()


def attack(server: Server, body: Callable[[Attacker], None], *, preface: bool = True) -> tuple[Attacker, Watch]:
    watch = Watch(server.port, server.process.pid)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    time.sleep(0.3)  # the health client is connected before the attack starts
    attacker = Attacker(server.port, Client().preface() if preface else None)
    try:
        body(attacker)
        attacker.ended()
        time.sleep(0.3)
    finally:
        attacker.close()
        watch.stop.set()
        thread.join(15)
    assert watch.failures == [], watch.failures
    assert watch.answered > 0
    assert watch.peak - server.baseline < RSS_BOUND, (watch.peak - server.baseline) >> 20
    print(f"RSS growth {(watch.peak - server.baseline) >> 20} MiB, {watch.answered} health checks answered")
    return attacker, watch


def test_streams_announcing_large_messages_cannot_buffer_past_the_connection_window(server: Server) -> None:
    def body(attacker: Attacker) -> None:
        client = attacker.client
        attacker.send(b"".join(client.headers(sid, request_headers("/t.T/Hold")) for sid in range(1, 301, 2)))
        chunk = b"x" * 16_000
        for sid in range(1, 301, 2):  # each announces 4 MiB and sends 4 MiB - 1, ignoring the windows
            if not attacker.send(client.data(sid, struct.pack(">BL", 0, 4 << 20) + chunk[:15_995])):
                return
            for _ in range(261):
                if attacker.goaway is not None or not attacker.send(client.data(sid, chunk)):
                    return
            if not attacker.send(client.data(sid, chunk[:2_308])):  # 4 MiB - 1 of the message in all
                return

    attacker, _ = attack(server, body)
    assert attacker.goaway == FLOW_CONTROL_ERROR
    assert attacker.resets.get(201) == REFUSED_STREAM  # the 101st stream


def test_hpack_bombs_end_in_compression_error(server: Server) -> None:
    def body(attacker: Attacker) -> None:
        client = attacker.client
        big = ("x-big", "b" * 4000)
        attacker.send(client.headers(1, [*request_headers("/t.T/Hold"), big]))
        for sid in range(3, 2001, 2):  # 15 references to a 4 KB entry: ~60 KiB decoded per block
            if not attacker.send(client.headers(sid, [*request_headers("/t.T/Hold"), *[big] * 15])):
                return

    attacker, _ = attack(server, body)
    assert attacker.goaway == COMPRESSION_ERROR


def test_idle_streams_with_large_header_lists_are_capped_then_refused(server: Server) -> None:
    def body(attacker: Attacker) -> None:
        client = attacker.client
        big = ("x-big", "b" * 4000)
        for sid in range(1, 2001, 2):  # 3 references to a 4 KB entry: ~12 KiB decoded, under the limit
            if not attacker.send(client.headers(sid, [*request_headers("/t.T/Hold"), *[big] * 3])):
                return

    attacker, _ = attack(server, body)
    assert attacker.resets.get(201) == REFUSED_STREAM
    assert attacker.goaway == ENHANCE_YOUR_CALM


def test_a_settings_flood_over_held_answers_ends_in_enhance_your_calm(server: Server) -> None:
    def body(attacker: Attacker) -> None:
        client = attacker.client
        attacker.send(frames.settings((frames.SETTINGS_INITIAL_WINDOW_SIZE, 0)))
        attacker.send(b"".join(client.call(sid, b"held") for sid in range(1, 201, 2)))  # 100 answers held
        attacker.flood(frames.settings((frames.SETTINGS_INITIAL_WINDOW_SIZE, 0)), 300_000)

    attacker, _ = attack(server, body)
    assert attacker.goaway == ENHANCE_YOUR_CALM


def test_rapid_reset_ends_in_enhance_your_calm(server: Server) -> None:
    def body(attacker: Attacker) -> None:
        client = attacker.client
        for start in range(1, 2_000_000, 2_000):
            batch = b"".join(
                client.headers(sid) + client.data(sid, message(b"x"), end_stream=True) + frames.rst_stream(sid, CANCEL)
                for sid in range(start, start + 2_000, 2)
            )
            if attacker.goaway is not None or not attacker.send(batch):
                return

    attacker, _ = attack(server, body)
    assert attacker.goaway == ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(frames.frame(PING, 0, 0, b"\0" * 8), id="ping"),
        pytest.param(frames.settings(), id="settings"),
        pytest.param(frames.frame(PRIORITY, 0, 3, struct.pack(">LB", 0, 1)), id="priority"),
        pytest.param(frames.window_update(0, 1), id="window-update"),
        pytest.param(frames.frame(DATA, 0, 1, b""), id="empty-data"),
        pytest.param(frames.frame(CONTINUATION, 0, 1, b""), id="empty-continuation"),
    ],
)
def test_floods_end_in_enhance_your_calm(server: Server, frame: bytes) -> None:
    def body(attacker: Attacker) -> None:
        block = attacker.client.block(request_headers("/t.T/Hold"))
        if frame[3] == DATA:
            attacker.send(frames.frame(HEADERS, END_HEADERS, 1, block))
        elif frame[3] == CONTINUATION:
            attacker.send(frames.frame(HEADERS, 0, 1, block))
        attacker.flood(frame, 1_000_000)

    attacker, _ = attack(server, body)
    assert attacker.goaway == ENHANCE_YOUR_CALM


def test_partial_prefaces_and_too_many_connections_are_closed(server: Server) -> None:
    crowd: list[Attacker] = []

    def body(attacker: Attacker) -> None:
        attacker.send(frames.PREFACE[:10])
        for _ in range(int(LIMITS["max_connections"]) + 10):
            crowd.append(Attacker(server.port, frames.PREFACE[:10]))

    attacker, _ = attack(server, body, preface=False)
    try:
        codes = [each.ended(10) for each in crowd]
        assert attacker.goaway == SETTINGS_TIMEOUT
        assert codes.count(ENHANCE_YOUR_CALM) >= 10  # over the cap: closed at once
        assert set(codes) <= {ENHANCE_YOUR_CALM, SETTINGS_TIMEOUT}
    finally:
        for each in crowd:
            each.close()


def test_an_idle_connection_is_closed_with_a_graceful_goaway(server: Server) -> None:
    attacker, _ = attack(server, lambda _attacker: None)
    assert attacker.goaway == NO_ERROR


def test_a_client_goaway_then_frames_close_the_connection_without_an_error(server: Server) -> None:
    def body(attacker: Attacker) -> None:
        attacker.send(frames.goaway(0, NO_ERROR))
        time.sleep(0.2)
        for _ in range(20):
            attacker.send(frames.frame(PING, 0, 0, b"\0" * 8) + attacker.client.call(1))

    attacker, _ = attack(server, body)
    assert attacker.goaway in (None, NO_ERROR)  # the server stderr has no traceback (the fixture)
