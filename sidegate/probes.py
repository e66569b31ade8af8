"""Readiness probes: what ``sidegate up``, the tests and the bench ask of a running process.
Nothing here reads a gateway.yaml. (The Envoy binary is found by ``sidegate.envoy_bin``.)"""

from __future__ import annotations

import errno
import socket
import urllib.request
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: connections of an earlier run in TIME_WAIT do not make a port "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror})"
    return None


def grpc_serving(address: str, service: str = "", timeout: float = 0.5) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def all_serving(targets: Sequence[str]) -> bool:
    """Whether every one of ``targets`` (``unix:PATH`` or ``host:port``) answers gRPC health."""
    return all(grpc_serving(target) for target in targets)


def envoy_ready(admin: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/ready", timeout=timeout) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
