"""Protocol-translation benchmark: translated requests per second of one core, Python CPU per request.

Each translated request is the whole ext_proc exchange the sidecar sees for it, in-process:
every phase arrives as a serialized ``ProcessingRequest`` (parsed here, as grpc would hand it
over), goes through the route's session, and its ``ProcessingResponse`` is serialized. The gRPC
transport and Envoy's own work are not in it (see DESIGN.md: each callout costs Envoy itself
~55-75 µs of CPU, and a headers-only ext_proc stream ~360-500 µs of Python). CPU is
``time.process_time`` around the batch.

    xml-client     XML request → JSON upstream, JSON answer → XML           (translate: {xml: client})
    xml-upstream   JSON request → XML upstream, XML answer → JSON           (translate: {xml: upstream})
    grpc           JSON POST → framed CreateOrderRequest, Order → JSON      (translate: {grpc: …})
    grpc-get       GET /orders/{id} → GetOrderRequest, Order → JSON         (no request body)
    passthrough    a JSON client on an xml-client route: headers only       (the floor)

With ``--envoy`` the same kinds of request go through a real stack instead (Envoy, one sidecar
worker, the echo and the demo gRPC upstreams, HTTP/1.1 clients over loopback): requests/s, and
the CPU µs per request of the sidecar process and of Envoy, read from ``/proc/PID/stat``.
``plain`` is a route with no ext_proc at all (Envoy and the echo alone) for comparison. The
client and the upstreams share the machine's cores, so requests/s is a floor.

    .venv/bin/python bench/translate_bench.py
    .venv/bin/python bench/translate_bench.py --sizes 1024,65536 --seconds 2
    .venv/bin/python bench/translate_bench.py --envoy --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
sys.path.insert(0, str(ROOT))

from extproc import grpc_translate  # noqa: E402 - after the path is set
from extproc.grpc_translate import frame  # noqa: E402
from extproc.session import GrpcSession, Session  # noqa: E402
from extproc.translators import XmlClient, XmlUpstream  # noqa: E402
from extproc.xml import to_xml  # noqa: E402
from sidegate import config  # noqa: E402
from sidegate.demo.v1 import orders_pb2  # noqa: E402

Exchange = list[tuple[str, bytes]]  # (phase, serialized ProcessingRequest)


def _request(phase: str, message: Any) -> bytes:
    return bytes(pb.ProcessingRequest(**{phase: message}).SerializeToString())


def _headers(pairs: dict[str, str], *, end: bool = False) -> pb.HttpHeaders:
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=end)


def _body(data: bytes, *, end: bool = True) -> pb.HttpBody:
    return pb.HttpBody(body=data, end_of_stream=end)


def order(size: int) -> dict[str, Any]:
    """A JSON order whose compact encoding is about ``size`` bytes."""
    doc: dict[str, Any] = {"id": "o-1", "customer": "ada lovelace", "status": "STATUS_NEW", "items": []}
    while len(json.dumps(doc, separators=(",", ":"))) < size:
        n = len(doc["items"])
        doc["items"].append({"sku": f"sku-{n:05d}", "quantity": n % 7 + 1, "priceCents": 100 + n})
    return doc


def _h(phase: str, pairs: dict[str, str], *, end: bool = False) -> tuple[str, bytes]:
    return phase, _request(phase, _headers(pairs, end=end))


def _b(phase: str, data: bytes, *, end: bool = True) -> tuple[str, bytes]:
    return phase, _request(phase, _body(data, end=end))


def _sized(media: str, body: bytes) -> dict[str, str]:
    return {"content-type": media, "content-length": str(len(body))}


def xml_client(doc: dict[str, Any]) -> tuple[Callable[[], Any], Exchange]:
    strategy = XmlClient("legacy", "order", "item", True, 1024 * 1024)
    xml, answer = to_xml(doc, root="order"), json.dumps(doc).encode()
    request = {":method": "POST", ":path": "/legacy/orders", "accept": "application/xml"}
    exchange = [
        _h("request_headers", request | _sized("application/xml", xml)),
        _b("request_body", xml),
        _h("response_headers", {":status": "200"} | _sized("application/json", answer)),
        _b("response_body", answer),
    ]
    return lambda: Session(strategy), exchange


def xml_upstream(doc: dict[str, Any]) -> tuple[Callable[[], Any], Exchange]:
    strategy = XmlUpstream("ledger", "order", "item", True, 1024 * 1024)
    body, answer = json.dumps(doc).encode(), to_xml(doc, root="order")
    exchange = [
        _h("request_headers", {":method": "POST", ":path": "/ledger"} | _sized("application/json", body)),
        _b("request_body", body),
        _h("response_headers", {":status": "200"} | _sized("application/xml", answer)),
        _b("response_body", answer),
    ]
    return lambda: Session(strategy), exchange


def passthrough(doc: dict[str, Any]) -> tuple[Callable[[], Any], Exchange]:
    strategy = XmlClient("legacy", "order", "item", True, 1024 * 1024)
    body = json.dumps(doc).encode()
    exchange = [
        _h("request_headers", {":method": "POST", ":path": "/legacy"} | _sized("application/json", body)),
        _h("response_headers", {":status": "200"} | _sized("application/json", body)),
    ]
    return lambda: Session(strategy), exchange


def _translator() -> grpc_translate.Translator:
    spec = config.GrpcTranslation.model_validate(
        {"service": "sidegate.demo.v1.Orders", "protos": [str(PROTOS / "sidegate/demo/v1/orders.proto")]}
        | {"proto_path": [str(PROTOS)]}
    )
    return grpc_translate.load(spec, ROOT, 1024 * 1024)


def _reply(doc: dict[str, Any]) -> bytes:
    message = orders_pb2.Order(id=doc["id"], customer=doc["customer"], status=orders_pb2.STATUS_NEW)
    for item in doc["items"]:
        message.items.add(sku=item["sku"], quantity=item["quantity"], price_cents=item["priceCents"])
    return frame(message.SerializeToString())


def _grpc_response(doc: dict[str, Any]) -> Exchange:
    status = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="grpc-status", raw_value=b"0")])
    return [
        _h("response_headers", {":status": "200", "content-type": "application/grpc"}),
        _b("response_body", _reply(doc), end=False),
        ("response_trailers", _request("response_trailers", pb.HttpTrailers(trailers=status))),
    ]


def grpc(doc: dict[str, Any]) -> tuple[Callable[[], Any], Exchange]:
    translator = _translator()
    body = json.dumps(doc).encode()
    exchange = [
        _h("request_headers", {":method": "POST", ":path": "/orders"} | _sized("application/json", body)),
        _b("request_body", body),
        *_grpc_response(doc),
    ]
    return lambda: GrpcSession(translator), exchange


def grpc_get(doc: dict[str, Any]) -> tuple[Callable[[], Any], Exchange]:
    translator = _translator()
    exchange = [_h("request_headers", {":method": "GET", ":path": "/orders/o-1"}, end=True), *_grpc_response(doc)]
    return lambda: GrpcSession(translator), exchange


SCENARIOS: dict[str, Callable[[dict[str, Any]], tuple[Callable[[], Any], Exchange]]] = {
    "xml-client": xml_client,
    "xml-upstream": xml_upstream,
    "grpc": grpc,
    "grpc-get": grpc_get,
    "passthrough": passthrough,
}


@dataclass
class Result:
    scenario: str
    size: int
    requests: int
    cpu: float

    @property
    def per_second(self) -> float:
        return self.requests / self.cpu

    @property
    def micros(self) -> float:
        return self.cpu / self.requests * 1e6


def run_one(session: Callable[[], Any], exchange: Exchange) -> None:
    current = session()
    for phase, data in exchange:
        request = pb.ProcessingRequest.FromString(data)
        reply = current.handle(phase, getattr(request, phase))
        if reply.WhichOneof("response") == "immediate_response":
            raise SystemExit(f"benchmark setup error: {reply.immediate_response.body!r}")
        reply.SerializeToString()


def measure(name: str, size: int, seconds: float) -> Result:
    session, exchange = SCENARIOS[name](order(size))
    for _ in range(20):  # warm: message classes, caches
        run_one(session, exchange)
    count, batch = 0, 10
    started = time.process_time()
    while (elapsed := time.process_time() - started) < seconds:
        for _ in range(batch):
            run_one(session, exchange)
        count += batch
        batch = min(batch * 2, 1000)
    return Result(name, size, count, elapsed)


# --- through Envoy ----------------------------------------------------------------------------

STACK = """\
listeners: [{{name: http, port: {http}}}]
admin: {{port: {admin}}}
sidecars:
  authz: {{address: "127.0.0.1:{sidecars}"}}
  ratelimit: {{address: "127.0.0.1:{sidecars}"}}
  extproc: {{address: "127.0.0.1:{sidecars}", timeout: 5s}}
services:
  echo: {{endpoints: ["127.0.0.1:{echo}"], retries: {{attempts: 0}}}}
  orders: {{endpoints: ["127.0.0.1:{grpc}"], protocol: grpc, retries: {{attempts: 0}}}}
apis:
  - {{name: legacy, match: {{prefix: /legacy}}, service: echo, auth: {{anonymous: true}}, translate: {{xml: client}}}}
  - {{name: plain, match: {{prefix: /plain}}, service: echo, auth: {{anonymous: true}}}}
  - name: orders
    match: {{prefix: /orders}}
    service: orders
    auth: {{anonymous: true}}
    translate:
      grpc:
        service: sidegate.demo.v1.Orders
        protos: ["{protos}/sidegate/demo/v1/orders.proto"]
        proto_path: ["{protos}"]
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _requests(name: str, size: int) -> tuple[str, str, dict[str, str], bytes]:
    """(method, path, headers, body) of one request of ``name``."""
    doc = order(size)
    if name == "xml-client":
        return "POST", "/legacy/o", {"content-type": "application/xml", "x-echo-reflect": "1"}, to_xml(doc)
    if name == "plain":
        return "POST", "/plain/o", {"content-type": "application/json", "x-echo-reflect": "1"}, json.dumps(doc).encode()
    if name == "grpc":
        doc.pop("id")
        return "POST", "/orders", {"content-type": "application/json"}, json.dumps(doc).encode()
    return "GET", f"/orders/big-{size}", {}, b""  # grpc-get: an order of that size, created first


async def _drive(base: str, request: tuple[str, str, dict[str, str], bytes], total: int, concurrency: int) -> float:
    import httpx  # noqa: PLC0415 - only this mode needs a client

    method, path, headers, body = request
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def worker(count: int) -> None:
            for _ in range(count):
                reply = await client.request(method, path, headers=headers, content=body)
                if reply.status_code != 200:
                    raise SystemExit(f"{method} {path}: {reply.status_code} {reply.text[:200]}")

        await worker(20)  # warm connections and caches
        started = time.perf_counter()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        return time.perf_counter() - started


def through_envoy(sizes: list[int], total: int, concurrency: int) -> None:
    import httpx  # noqa: PLC0415

    from sidegate.cli.up import Stack  # noqa: PLC0415
    from sidegate.config import HostPort  # noqa: PLC0415
    from sidegate.settings import Settings  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="translate-bench-") as tmp:
        ports = {name: _free_port() for name in ("http", "admin", "sidecars", "echo", "grpc")}
        path = Path(tmp) / "gateway.yaml"
        path.write_text(STACK.format(protos=ROOT / "protos", **ports))
        settings = Settings(state_dir=Path(tmp) / "state", workers=1, admin_port=0, log_level="warning")
        echo = HostPort.model_validate(f"127.0.0.1:{ports['echo']}")
        stack = Stack(path, settings, echo=echo, log_dir=Path(tmp) / "logs", demo_grpc=True)
        base = f"http://127.0.0.1:{ports['http']}"
        with stack.running():
            sidecar = next(c for c in stack.children if c.name.startswith("sidecars"))
            envoy = stack.child("envoy")
            assert sidecar.proc is not None
            assert envoy.proc is not None
            for size in sizes:  # the orders grpc-get reads
                doc = order(size) | {"id": f"big-{size}"}
                httpx.post(f"{base}/orders", json=doc, timeout=30).raise_for_status()
            print(f"{'through Envoy':<14} {'body':>8} {'requests/s':>12} {'sidecar µs/req':>15} {'Envoy µs/req':>13}")
            for name in ("plain", "xml-client", "grpc", "grpc-get"):
                for size in sizes:
                    before = _cpu(sidecar.proc.pid), _cpu(envoy.proc.pid)
                    wall = asyncio.run(_drive(base, _requests(name, size), total, concurrency))
                    after = _cpu(sidecar.proc.pid), _cpu(envoy.proc.pid)
                    done = total // concurrency * concurrency
                    side, env = ((a - b) / done * 1e6 for a, b in zip(after, before, strict=True))
                    label = f"{size // 1024} KB"
                    print(f"{name:<14} {label:>8} {done / wall:>12,.0f} {side:>15,.1f} {env:>13,.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,65536", help="JSON body sizes in bytes (comma list)")
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list")
    parser.add_argument("--envoy", action="store_true", help="through a real Envoy stack instead")
    parser.add_argument("--requests", type=int, default=1000, help="--envoy: requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="--envoy: requests in flight")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.envoy:
        through_envoy(sizes, args.requests, args.concurrency)
        return 0
    print(f"{'scenario':<14} {'body':>8} {'requests/s':>12} {'CPU µs/request':>15}")
    for name in args.scenarios.split(","):
        for size in sizes:
            result = measure(name, size, args.seconds)
            label = f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"
            print(f"{name:<14} {label:>8} {result.per_second:>12,.0f} {result.micros:>15,.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
