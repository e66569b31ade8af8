"""The floor under every sidecar: what one gRPC call costs the server with nothing to decide.

    .venv/bin/python -m bench.grpc_floor [--calls N]

Starts a minimal servicer (``Authorization/Check`` answering a prebuilt OK ``CheckResponse``,
uvloop, one process) on each server layer in turn: ``grpc.aio`` and ``sidegate.grpc_h2c`` (what
the sidecars run on). Drives each with ``h2load`` sending real gRPC frames (a ``CheckRequest`` as
``bench.authz_bench`` builds it) over 2 connections with 32 streams each, as Envoy's worker
threads do. Prints calls/s and the server's CPU (every thread, user + system, as the server's
own ``process_time`` reports it on SIGUSR1: ``/proc`` counts in 10 ms ticks, too coarse here)
per call: the part of a sidecar's CPU per request that no handler can remove. Loopback only,
bounded; it stops each server it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from bench.authz_bench import UNKNOWN_KEY, check_request, free_port
from bench.load import ensure_tool
from sidegate import grpc_h2c

OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))


class Minimal(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802
        return OK


async def serve(port: int, layer: str) -> None:
    server: Any = grpc.aio.server() if layer == "grpc.aio" else grpc_h2c.Server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Minimal(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()

    def report() -> None:  # one line the parent reads: this process's CPU seconds, every thread
        print(time.process_time(), flush=True)

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report)
    await server.wait_for_termination()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def h2load(binary: str, port: int, body: Path, calls: int) -> float:
    """Send ``calls`` Check calls; the wall seconds they took."""
    argv = [binary, "-n", str(calls), "-c", "2", "-m", "32", "-d", str(body)]
    argv += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    argv.append(f"http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check")
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0 or f"{calls} succeeded" not in done.stdout:
        raise SystemExit(f"h2load failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    return time.perf_counter() - started


LAYERS = ("grpc.aio", "grpc_h2c")


def server_cpu(server: subprocess.Popen[str]) -> float:
    """CPU seconds the minimal server has used so far, in its own words (SIGUSR1, one line back)."""
    assert server.stdout is not None
    server.send_signal(signal.SIGUSR1)
    ready, _, _ = select.select([server.stdout], [], [], 10)
    line = server.stdout.readline() if ready else ""
    if not line:
        raise SystemExit("the minimal server did not report its CPU within 10 s")
    return float(line)


def measure(binary: str, layer: str, calls: int) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) of ``calls`` Check calls to a minimal server on ``layer``."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.grpc_floor", "--serve", str(port), "--layer", layer]
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the minimal {layer} server did not start")
            time.sleep(0.05)
        with tempfile.TemporaryDirectory() as tmp:
            body = Path(tmp, "check.bin")
            message = check_request(UNKNOWN_KEY).SerializeToString()
            body.write_bytes(b"\0" + struct.pack(">I", len(message)) + message)
            h2load(binary, port, body, 2_000)  # warm: connections, caches
            cpu = server_cpu(server)
            wall = h2load(binary, port, body, calls)
            return wall, server_cpu(server) - cpu
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--layer", choices=LAYERS, default="grpc_h2c", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        uvloop.install()
        asyncio.run(serve(args.serve, args.layer))
        return
    binary = ensure_tool("h2load", "nghttp2-client")
    print(f"minimal Check server (grpcio {grpc.__version__}, uvloop, 1 process, h2load 2 connections x 32 streams)")
    for layer in LAYERS:
        wall, cpu = measure(binary, layer, args.calls)
        rate, per_call = args.calls / wall, cpu / args.calls * 1e6
        print(f"{layer:<9} {args.calls:,} calls  {rate:,.0f} calls/s  server CPU {per_call:,.0f} µs/call")


if __name__ == "__main__":
    main()
