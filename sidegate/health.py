"""The probe of a sidecar server: ``python -m sidegate.health`` (also ``sidegate health``).

It takes the flags and variables of the ``sidegate serve`` it checks, so it resolves them to the
same worker sockets (or port), and exits 0 when every worker answers the gRPC health of every
sidecar named, else 1 with one line on stderr. The image's HEALTHCHECK and the Kubernetes
probes run it every few seconds, so it imports only the config model, the settings and gRPC.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidegate import contract, serving
from sidegate.errors import ConfigError, SidegateError
from sidegate.settings import Settings

TIMEOUT = 2.0  # seconds each worker gets to answer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sidecars", default=",".join(contract.SIDECARS), help="comma list (default: all three)")
    serving.add_serve_args(parser)


def serving_all(target: str, services: Sequence[str], timeout: float = TIMEOUT) -> str | None:
    """None when ``target`` answers SERVING for every one of ``services``, else why not."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            except grpc.RpcError as exc:
                return f"{target} does not answer for {service} ({exc.code().name})"
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                return f"{target} does not serve {service} ({status})"
    return None


def unhealthy(settings: Settings, names: Sequence[str]) -> str | None:
    """Why the server of ``names`` with ``settings`` is not healthy, or None: every worker asked."""
    services = [contract.SIDECAR_GRPC_SERVICE[name] for name in names]
    for target in serving.targets(settings):
        problem = serving_all(target, services)
        if problem is not None:
            return problem
    return None


def run(args: argparse.Namespace) -> int:
    names = serving.sidecar_names(args.sidecars)
    problem = unhealthy(serving.serve_settings(args, names), names)
    if problem is not None:
        print(f"sidegate health: {problem}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidegate.health", allow_abbrev=False, description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as exc:  # a probe says only healthy (0) or not (1): Docker reserves 2
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    except SidegateError as exc:
        print(f"sidegate health: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
