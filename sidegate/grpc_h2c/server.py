"""The asyncio side: sockets, one protocol object per connection around the sans-I/O
``Connection``, the clock that drives its timeouts, and ``Server``, the ``grpc.aio.Server``
look-alike the sidecars are registered on.

Everything a read produces leaves in one write at the end of that read; what tasks send later
leaves in one write per turn of the event loop. A worker takes at most ``Limits.max_connections``
connections; over its ``Budget`` of request bytes, a connection holding more than its fair share
stops being read until handlers have consumed enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Iterable
from typing import Any

from sidegate import logs
from sidegate.grpc_h2c.calls import Call, Dispatcher
from sidegate.grpc_h2c.connection import Connection
from sidegate.grpc_h2c.frames import ENHANCE_YOUR_CALM, INTERNAL_ERROR
from sidegate.grpc_h2c.limits import GOAWAY_NOTICE, Budget, Limits

log = logging.getLogger("sidegate.grpc")


class _Protocol(asyncio.Protocol):
    """One connection's socket: bytes in to its ``Connection``, its bytes out to the socket."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.core = Connection(server.dispatcher, server.limits, server.budget, self.loop.time(), Call)
        self.core.notify = self.schedule
        self.flushing = False
        self.eof = False
        self.paused = False  # reading stopped: the worker is over its budget

    @property
    def calls(self) -> dict[int, Call]:
        return self.core.streams

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):  # grpc's spelling: ipv4:HOST:PORT, ipv6:[HOST]:PORT
            self.core.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if len(peer) == 4 else f"ipv4:{peer[0]}:{peer[1]}"
        else:
            self.core.peer = str(peer)
        with contextlib.suppress(OSError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connections = self.server.connections
        connections.add(self)
        self.core.initiate()
        if len(connections) > self.server.limits.max_connections:
            self.core.terminate(ENHANCE_YOUR_CALM, "too many connections")
        elif self.server.stopping:
            self.core.goaway(final=True)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.budget.sleepers.pop(id(self), None)
        self.eof = True
        self.core.drop_streams()

    # A peer that sends faster than it reads our answers (PINGs, or calls whose answers it never
    # takes) fills the socket's write buffer: stop reading it until the buffer drains.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing() and not self.paused:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.eof:  # we have half-closed: nothing the peer says now changes anything
            return
        core = self.core
        self.flushing = True  # one write at the end of the read, not one per answer
        try:
            core.receive(data)
        except Exception:  # a bug of ours: this connection ends with a GOAWAY, the server serves on
            log.exception("closing a gRPC connection: internal error", extra=logs.fields(peer=core.peer))
            core.terminate(INTERNAL_ERROR, "internal error")
        self.flush()
        budget = self.server.budget
        if budget.held > budget.limit and core.held > core.limits.fair_share and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
            budget.sleepers[id(self)] = self.wake

    def wake(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def schedule(self) -> None:
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        core = self.core
        out = core.out
        transport = self.transport
        if out:
            if not self.eof and transport is not None and not transport.is_closing():
                transport.write(b"".join(out))
            out.clear()
        if transport is None or self.eof:
            return
        if core.terminated is not None:
            log.warning(
                "closing a gRPC connection",
                extra=logs.fields(peer=core.peer, code=core.terminated, reason=core.reason),
            )
            self.eof = True
            transport.close()
        elif core.closing and not core.streams:
            self.finish(transport)

    def finish(self, transport: asyncio.Transport) -> None:
        """Half-close and let the peer close: closing at once would answer bytes it sent before
        it read our GOAWAY with a TCP reset, and it would never read the GOAWAY."""
        self.eof = True
        try:
            transport.write_eof()
        except (OSError, NotImplementedError, RuntimeError):  # the peer is gone already
            transport.close()
        else:
            self.loop.call_later(GOAWAY_NOTICE * 2, transport.close)

    def tick(self, now: float) -> None:
        if self.eof:
            return
        self.core.tick(now)
        self.server.dispatcher.sweep(self.core.streams.values(), now)
        self.flush()

    def close_now(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()


class Server:
    """A ``grpc.aio.Server`` look-alike for the calls the sidecars serve (see the package doc).

    Made inside the running event loop that serves it; ``limits`` defaults to ``Limits()``."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.loop = asyncio.get_running_loop()  # made inside the loop that serves it, as grpc.aio's
        self.dispatcher = Dispatcher(self.loop)
        self.budget = Budget(self.limits.worker_buffer)
        self.sockets: list[socket.socket] = []
        self.paths: dict[str, int] = {}  # Unix socket paths this server bound → their inode
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Protocol] = set()
        self.stopping = False
        self.stopped = asyncio.Event()
        self.ticker: asyncio.TimerHandle | None = None

    @property
    def calls(self) -> set[asyncio.Task[None]]:
        """Calls that a task runs (a call answered at once, or parked, has none)."""
        return self.dispatcher.calls

    # -- what grpc's generated code and our kernel call ----------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self.dispatcher.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.dispatcher.add_registered_method_handlers(service, handlers)

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

    def add_unix_socket(self, path: str, mode: int = 0o600, group: int | None = None) -> bool:
        """Listen on the Unix socket ``path`` (made with ``mode``, owned by ``group`` when given),
        replacing a stale socket file that no process listens on; False when it cannot (a live
        server, not a socket, no folder); ``PermissionError`` when this user may not give the
        file to ``group``.

        The file is removed when the server stops. Envoy is the only client meant to reach it:
        ``mode``, ``group`` and the folder's permissions decide who else on the host can.
        """
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        else:
            if not stat.S_ISSOCK(existing.st_mode) or unix_listening(path):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by a worker that was killed: nobody listens on it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The file is born 0600 (the umask): no window in which anyone else may connect. The
        # group and the wider ``mode`` come after, in that order.
        umask = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            return False
        finally:
            os.umask(umask)
        try:
            if group is not None:
                os.chown(path, -1, group)
            os.chmod(path, mode)
        except OSError:
            sock.close()
            os.unlink(path)
            raise
        sock.setblocking(False)
        self.sockets.append(sock)
        self.paths[path] = os.stat(path).st_ino
        return True

    async def start(self) -> None:
        loop = self.loop = self.dispatcher.loop = asyncio.get_running_loop()
        for sock in self.sockets:
            server = await loop.create_server(lambda: _Protocol(self), sock=sock, backlog=1024)
            self.servers.append(server)
        self.ticker = loop.call_later(self.limits.tick, self.tick)

    def tick(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            connection.tick(now)
        if not self.stopped.is_set():
            self.ticker = self.loop.call_later(self.limits.tick, self.tick)

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
            connection.core.goaway(final=False)
            connection.flush()
        if self.connections and grace != 0:
            await asyncio.sleep(GOAWAY_NOTICE if grace is None else min(GOAWAY_NOTICE, grace))
        for connection in list(self.connections):
            connection.core.goaway(final=True)
            connection.flush()
        while any(c.core.streams for c in self.connections) and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.02)
        for task in list(self.calls):
            task.cancel()
        for connection in list(self.connections):
            for call in list(connection.core.streams.values()):
                call.interrupt()  # parked calls have no task to cancel
        await asyncio.sleep(0)  # cancelled calls send their CANCELLED trailers
        for connection in list(self.connections):
            connection.close_now()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self.ticker is not None:
            self.ticker.cancel()
        self.remove_sockets()
        self.stopped.set()

    def remove_sockets(self) -> None:
        """Remove the socket files this server made (not one another server has bound since)."""
        for path, inode in self.paths.items():
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
        self.paths.clear()

    async def wait_for_termination(self) -> None:
        await self.stopped.wait()


def unix_listening(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True
