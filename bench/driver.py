"""A constant-rate HTTP/1.1 load driver (wrk2-style): latency counted from when a request was due.

Request ``i`` is due at ``start + i / rate``, whatever happened before it. It goes out on an idle
keep-alive connection as soon as it is due; when every connection is busy it waits for one, and
that wait is part of its latency (counted from when it was due; otherwise from when it was sent,
because the event loop's timers are only millisecond-precise). So a slow gateway shows as high
latency instead of as a lower offered rate (the "coordinated omission" of closed-loop tools, and
of ``h2load --rps``, whose clients also fire in step: 50 clients at 20 requests/s each send
bursts of 50).

Standalone (standard library; uvloop when installed) so the harness can run it as its own
process and read its CPU time. Writes h2load's log format, one line per completed request:
``due time µs since epoch <TAB> status <TAB> latency µs``; prints a JSON summary on stdout.

    python bench/driver.py --url http://127.0.0.1:8080/orders/1 --rate 1000 --seconds 5 \\
        --connections 50 --log-file log.tsv [-H 'x-api-key: …'] [--method POST --body-file b.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

TIMEOUT = 10.0  # seconds a request may take before it is counted as a timeout


class ProtocolError(Exception):
    pass


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the response end is timed on arrival."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, int]] | None = None
        self.closed = False
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(str(exc or "connection closed")))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            status = self._complete()
        except ProtocolError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)
            return
        if status is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, time.perf_counter_ns()))

    def _complete(self) -> int | None:
        """The status of a complete response at the start of the buffer (consumed), else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise ProtocolError(f"bad status line {head[0]!r}") from None
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        body_start = end + 4
        if "chunked" in headers.get("transfer-encoding", ""):
            size = self._chunked_end(body_start)
            if size is None:
                return None
            consumed = size
        else:
            length = int(headers.get("content-length", "0") or 0)
            if len(self.buffer) < body_start + length:
                return None
            consumed = body_start + length
        del self.buffer[:consumed]
        self.close_after = headers.get("connection") == "close"
        return status

    def _chunked_end(self, at: int) -> int | None:
        while True:
            line_end = self.buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            try:
                size = int(bytes(self.buffer[at:line_end]).split(b";")[0], 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            at = line_end + 2
            if size == 0:
                trailer_end = self.buffer.find(b"\r\n\r\n", at - 2)
                return None if trailer_end < 0 else trailer_end + 4
            if len(self.buffer) < at + size + 2:
                return None
            at += size + 2

    async def send(self, payload: bytes) -> tuple[int, int, int]:
        """Send one request; (status, perf_counter_ns when sent, and when its last byte arrived)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        sent = time.perf_counter_ns()
        self.transport.write(payload)
        status, done = await asyncio.wait_for(self.waiter, TIMEOUT)
        return status, sent, done


def build_request(url: str, method: str, headers: Sequence[str], body: bytes | None) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"driver: only http:// URLs: {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1"]
    if not any(h.partition(":")[0].strip().lower() == "host" for h in headers):
        lines.append(f"host: {parts.netloc}")  # unless a header names the host (a mesh call: Host: payments)
    lines += list(headers)
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    return parts.hostname, parts.port or 80, payload


class Schedule:
    """Offers ``rate`` requests/s for ``seconds`` over a pool of keep-alive connections."""

    def __init__(self, host: str, port: int, payload: bytes, *, rate: float, seconds: float) -> None:
        self.host, self.port, self.payload = host, port, payload
        self.rate, self.seconds = rate, seconds
        self.idle: asyncio.Queue[Connection] = asyncio.Queue()
        self.results: list[tuple[int, int, int]] = []  # (due µs since epoch, status, latency µs)
        self.failures = {"errored": 0, "timeout": 0}
        self.tasks: set[asyncio.Task[None]] = set()
        self.epoch_offset = time.time_ns() - time.perf_counter_ns()
        self.first_due = self.last_done = 0  # perf_counter ns: how long offering and answering took

    async def connect(self) -> Connection:
        _, protocol = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        return protocol

    async def one(self, due: int, queued: bool, conn: Connection) -> None:
        try:
            status, sent, done = await conn.send(self.payload)
            # Waiting for a free connection is the gateway's doing: count from when it was due.
            # Otherwise count from the send: the event loop's timers are only ms-precise, and
            # their lateness is this driver's, not the gateway's.
            start = due if queued else sent
            self.last_done = max(self.last_done, done)
            self.results.append(((due + self.epoch_offset) // 1000, status, (done - start) // 1000))
        except TimeoutError:
            self.failures["timeout"] += 1
            conn.closed = True
        except Exception:  # every failure is counted; none stops the run
            self.failures["errored"] += 1
            conn.closed = True
        if conn.closed or conn.close_after:
            if conn.transport is not None:
                conn.transport.close()
            try:
                conn = await self.connect()
            except OSError:
                self.failures["errored"] += 1
                return  # one connection fewer; the schedule waits for the others
        self.idle.put_nowait(conn)

    async def run(self, connections: int) -> None:
        for _ in range(connections):
            self.idle.put_nowait(await self.connect())
        total = int(self.rate * self.seconds)
        interval = 1e9 / self.rate
        start = self.first_due = time.perf_counter_ns() + 20_000_000
        for i in range(total):
            due = start + int(i * interval)
            delay = (due - time.perf_counter_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            queued = self.idle.empty()
            try:
                conn = await asyncio.wait_for(self.idle.get(), TIMEOUT)  # a wait here is latency
            except TimeoutError:
                self.failures["timeout"] += total - i  # every connection is stuck or gone: stop
                break
            task = asyncio.create_task(self.one(due, queued, conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=TIMEOUT + 1)
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn.transport is not None:
                conn.transport.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/driver.py", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second offered")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--method", default="GET")
    p.add_argument("-H", "--header", action="append", default=[], help="'name: value'")
    p.add_argument("--body-file")
    p.add_argument("--log-file", required=True)
    args = p.parse_args(argv)
    body = None
    if args.body_file:
        with open(args.body_file, "rb") as handle:
            body = handle.read()
    host, port, payload = build_request(args.url, args.method, args.header, body)
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional: less CPU per request

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    gc.disable()  # no collector pauses inside the measurement
    schedule = Schedule(host, port, payload, rate=args.rate, seconds=args.seconds)
    asyncio.run(schedule.run(args.connections))
    # From the first request due to the last answer, plus one interval for the last one's slot.
    elapsed = max(0, schedule.last_done - schedule.first_due) / 1e9 + 1 / args.rate
    with open(args.log_file, "w") as log:
        log.writelines(f"{due}\t{status}\t{latency}\n" for due, status, latency in schedule.results)
    print(json.dumps({"seconds": round(elapsed, 3), "done": len(schedule.results), **schedule.failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
