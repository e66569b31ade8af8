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

    .venv/bin/python bench/translate_bench.py
    .venv/bin/python bench/translate_bench.py --sizes 1024,65536 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import sys
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
    return pb.ProcessingRequest(**{phase: message}).SerializeToString()


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,65536", help="JSON body sizes in bytes (comma list)")
    parser.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'scenario':<14} {'body':>8} {'requests/s':>12} {'CPU µs/request':>15}")
    for name in args.scenarios.split(","):
        for size in sizes:
            result = measure(name, size, args.seconds)
            label = f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"
            print(f"{name:<14} {label:>8} {result.per_second:>12,.0f} {result.micros:>15,.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
