"""Two authz replicas (separate ``python -m authz`` processes) on one Redis key store: a key revoked
through the key service stops working on both within a second, and neither logs a key or digest.

The replicas are called the way Envoy calls them: ext_authz ``Check`` over gRPC, with the API named
in the route's context extensions.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz import apikeys
from authz.keyservice import KeyService, NewKey
from authz.keystore import CHANNEL, RedisKeyStore
from sidegate.config import ApiKeys
from tests.conftest import LOGS, ROOT, RedisServer, free_port, wait_until

PEPPER = "replica-test-pepper-0123456789"
DEADLINE = 1.0  # the issue's promise: revoked everywhere within a second
POLL = 0.02
CONFIG = """
listeners: [{name: http, port: 8080}]
services: {echo: {endpoints: ["127.0.0.1:9000"]}}
apis:
  - name: orders
    match: {prefix: /orders}
    service: echo
    auth: {api_key: true, scopes: {GET: [orders:read]}}
"""


@dataclass
class Replica:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"replica on {self.port} exited with {self.proc.returncode}: {self.log.read_text()}")
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=0.5
                )
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Replicas:
    redis: RedisServer
    members: list[Replica]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("replicas")
    store = RedisServer(workdir)
    store.start()
    config = workdir / "gateway.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDEGATE_")} | {"SIDEGATE_KEY_PEPPER": PEPPER}
    members: list[Replica] = []
    try:
        for name in ("a", "b"):
            port, log = free_port(), workdir / f"authz-{name}.log"
            argv = [
                sys.executable,
                "-m",
                "authz",
                "--config",
                str(config),
                "--port",
                str(port),
                "--workers",
                "1",
                "--redis",
                store.url,
                "--state-dir",
                str(workdir / f"state-{name}"),
                "--admin-port",
                "0",
            ]
            with log.open("wb") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            members.append(Replica(proc, port, log))
            LOGS.append(log)
        for member in members:
            wait_until(member.serving, timeout=30, what=f"authz replica on {member.port}")
        # Both follow the change feed before any test revokes anything.
        with redis.Redis.from_url(store.url) as client:
            wait_until(lambda: dict(client.pubsub_numsub(CHANNEL)).get(CHANNEL.encode(), 0) >= 2, what="subscribers")
        yield Replicas(store, members)
    finally:
        for member in members:
            if member.proc.poll() is None:
                member.proc.kill()
            member.proc.wait(10)
        store.stop()


def check_request(key: str) -> Any:
    request = external_auth_pb2.CheckRequest()
    request.attributes.context_extensions["api"] = "orders"
    http = request.attributes.request.http
    http.method = "GET"
    http.path = "/orders/1"
    http.headers["x-api-key"] = key
    return request


def allowed(reply: Any) -> bool:
    return bool(reply.status.code == 0 and reply.HasField("ok_response"))


def denied_reason(reply: Any) -> str | None:
    """The reason of a 401, None otherwise."""
    if not reply.HasField("denied_response") or reply.denied_response.status.code != 401:
        return None
    return str(json.loads(reply.denied_response.body)["reason"])


async def until(stubs: list[Any], request: Any, wanted: Any, within: float) -> list[float | None]:
    """Poll every stub every 20 ms until ``wanted(reply)``; the seconds each took (None: not in time)."""
    start = time.monotonic()
    took: list[float | None] = [None] * len(stubs)
    while time.monotonic() - start < within and None in took:
        replies = await asyncio.gather(*(stub.Check(request, timeout=1.0) for stub in stubs))
        for i, reply in enumerate(replies):
            if took[i] is None and wanted(reply):
                took[i] = time.monotonic() - start
        await asyncio.sleep(POLL)
    return took


async def issue(url: str) -> tuple[KeyService, RedisKeyStore, NewKey]:
    store = RedisKeyStore(url)
    service = KeyService(store, PEPPER.encode(), ApiKeys(), time.time)
    return service, store, await service.create(consumer="acme", scopes=["orders:read"], actor="test")


def test_a_revoked_key_stops_on_both_replicas_within_a_second(replicas: Replicas) -> None:
    async def scenario() -> list[float | None]:
        service, store, new = await issue(replicas.redis.url)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{m.port}") for m in replicas.members]
        try:
            stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
            request = check_request(new.key)
            warm = await until(stubs, request, allowed, within=10.0)
            assert None not in warm, "a new key is allowed by both replicas"
            assert None not in await until(stubs, request, allowed, within=1.0)  # now from their caches
            await service.revoke(new.record.key_id, actor="test", reason="leaked")
            took = await until(stubs, request, lambda r: denied_reason(r) == "api_key_revoked", within=DEADLINE)
            for member, seconds in zip(replicas.members, took, strict=True):
                shown = "not within 1 s" if seconds is None else f"{seconds * 1000:.0f} ms"
                print(f"replica on port {member.port}: revoked key denied after {shown}")
            return took
        finally:
            for channel in channels:
                await channel.close()
            await store.close()

    took = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert None not in took, took


def test_no_replica_logs_a_key_or_its_digest(replicas: Replicas) -> None:
    async def scenario() -> list[str]:
        service, store, new = await issue(replicas.redis.url)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{m.port}") for m in replicas.members]
        forged = new.key[:-1] + ("a" if new.key[-1] != "a" else "b")
        try:
            stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
            assert None not in await until(stubs, check_request(new.key), allowed, within=10.0)
            for stub in stubs:  # a denial is logged: with the key's request in hand
                reply = await stub.Check(check_request(forged), timeout=1.0)
                assert denied_reason(reply) == "api_key_unknown"
            await service.revoke(new.record.key_id, actor="test")
            revoked = await until(stubs, check_request(new.key), lambda r: denied_reason(r) == "api_key_revoked", 5.0)
            assert None not in revoked
            return [new.key, forged]
        finally:
            for channel in channels:
                await channel.close()
            await store.close()

    presented = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    pepper = PEPPER.encode()
    needles = {secret: secret for secret in presented}
    needles |= {f"digest of {secret[:12]}": apikeys.digest(pepper, secret) for secret in presented}
    needles["pepper"] = PEPPER
    for member in replicas.members:
        text = member.log.read_text(errors="replace")
        assert '"msg":"denied"' in text, "the replica logs denials: the grep below reads real logs"
        leaked = [name for name, needle in needles.items() if needle in text]
        assert not leaked, f"{member.log.name} holds {leaked}"
