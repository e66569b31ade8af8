"""Protocol translation through real Envoy: XML clients of a JSON service, JSON clients of an XML
service, DTD attacks refused, and REST/JSON clients of a real gRPC service (started here) —
with ext_proc called only on the routes that translate."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.xml import from_xml
from sidegate.cli.up import Stack
from sidegate.config import HostPort
from sidegate.probes import grpc_serving
from sidegate.settings import Settings
from tests.conftest import LOGS, ROOT, free_port, render_config, wait_until
from tests.e2e.conftest import PORTS, TEMPLATE, Gateway, start

EXTPROC_CALLS = "cluster.sidegate_extproc.upstream_rq_total"
REFLECT = {"x-echo-reflect": "1"}
XML_TYPE = {"content-type": "application/xml"}


@pytest.fixture(scope="module")
def grpc_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The demo gRPC service, as `sidegate demo-grpc` runs it, on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo-grpc") / "demo-grpc.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidegate", "demo-grpc", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    LOGS.append(log)
    try:
        wait_until(lambda: grpc_serving(f"127.0.0.1:{port}"), what="demo gRPC upstream")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def translating(tmp_path_factory: pytest.TempPathFactory, grpc_upstream: int) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("translate")
    ports = {name: free_port() for name in PORTS} | {"grpc": grpc_upstream}
    config = render_config(
        TEMPLATE.with_name("translate.yaml"), workdir / "gateway.yaml", protos=ROOT / "protos", **ports
    )
    settings = Settings(state_dir=workdir / "state", workers=1, grace=5.0, admin_port=0)
    echo = HostPort.model_validate(f"127.0.0.1:{ports['echo']}")
    stack = Stack(config, settings, echo=echo, log_dir=workdir / "logs")
    start(stack)
    try:
        yield Gateway(stack, ports)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(translating: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{translating.ports['http']}", timeout=10) as http:
        yield http


def json_error(reply: httpx.Response, status: int, error: str) -> dict[str, object]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["error"] == error, body
    return dict(body)


def framed_correctly(reply: httpx.Response) -> None:
    """Envoy frames a replaced body itself: never a stale content-length."""
    assert reply.headers.get("content-length", str(len(reply.content))) == str(len(reply.content))


# -- XML clients of a JSON service ---------------------------------------------------------


ORDER_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<order id="o-7" xmlns:acme="urn:acme">
  <customer>ada</customer>
  <item><sku>bolt</sku><quantity>3</quantity></item>
  <item><sku>nut</sku><quantity>10</quantity></item>
  <acme:note>rush</acme:note>
  <paid>true</paid>
  <zip json:type="string" xmlns:json="urn:sidegate:json">01234</zip>
</order>"""


def test_xml_client_json_upstream_round_trip(client: httpx.Client) -> None:
    reply = client.post(
        "/legacy/orders", headers={**XML_TYPE, **REFLECT, "accept": "application/xml"}, content=ORDER_XML
    )
    assert reply.status_code == 200, reply.text
    received = json.loads(reply.headers["x-echo-received"])  # what the JSON upstream got
    assert received == {
        "@id": "o-7",
        "@xmlns:acme": "urn:acme",
        "customer": "ada",
        "item": [{"sku": "bolt", "quantity": 3}, {"sku": "nut", "quantity": 10}],
        "acme:note": "rush",
        "paid": True,
        "zip": "01234",
    }
    # …and the JSON answer comes back to the XML client as XML, under the route's root
    assert reply.headers["content-type"] == "application/xml"
    assert reply.content.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<order ')
    assert from_xml(reply.content) == received
    framed_correctly(reply)


def test_the_json_upstream_gets_json_headers(client: httpx.Client) -> None:
    reply = client.post("/legacy/orders", headers={**XML_TYPE, "accept": "application/xml"}, content=b"<o><a>1</a></o>")
    seen = from_xml(reply.content)  # the echo's JSON document, as XML
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["headers"]["accept"] == "application/json"
    assert json.loads(seen["body"]) == {"a": 1}


def test_json_clients_of_the_same_api_pass_through(translating: Gateway, client: httpx.Client) -> None:
    reply = client.post("/legacy/orders", headers={"content-type": "application/json"}, content=b'{"a": 1}')
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.json()["body"]) == {"a": 1}
    # an XML client asking with GET (no body) still gets XML
    reply = client.get("/legacy/orders/7", headers={"accept": "application/xml"})
    assert reply.headers["content-type"] == "application/xml"
    assert from_xml(reply.content)["path"] == "/legacy/orders/7"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (  # billion laughs: entity expansion
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
            b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><order>&lol3;</order>',
            "DTDs are not allowed",
        ),
        (  # XXE: an external entity
            b'<?xml version="1.0"?><!DOCTYPE order [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><order>&xxe;</order>',
            "DTDs are not allowed",
        ),
        (  # an external DTD
            b'<?xml version="1.0"?><!DOCTYPE order SYSTEM "http://127.0.0.1:1/evil.dtd"><order/>',
            "DTDs are not allowed",
        ),
        (b"<order>&xxe;</order>", "undefined entity"),  # an entity nobody declared
        (b"<order><customer>ada</order>", "mismatched tag"),
    ],
    ids=["billion-laughs", "xxe", "external-dtd", "undeclared-entity", "malformed"],
)
def test_dtds_entities_and_malformed_xml_are_400(client: httpx.Client, body: bytes, problem: str) -> None:
    reply = client.post("/legacy/orders", headers={**XML_TYPE, **REFLECT}, content=body)
    error = json_error(reply, 400, "invalid_xml")
    assert problem in str(error["message"])
    assert "root:" not in reply.text
    assert "Traceback" not in reply.text


def test_body_limit_per_route(client: httpx.Client) -> None:
    big = b"<order><note>" + b"x" * 70_000 + b"</note></order>"
    json_error(client.post("/legacy/orders", headers=XML_TYPE, content=big), 413, "body_too_large")


# -- JSON clients of an XML service ----------------------------------------------------------


def test_json_client_xml_upstream_round_trip(client: httpx.Client) -> None:
    entry = {"id": 7, "amount": 12.5, "tags": ["a", "b"], "memo": None, "ref": "0042", "lines": [{"sku": "x"}]}
    headers = {"content-type": "application/json", **REFLECT}
    reply = client.post("/ledger/entries", headers=headers, content=json.dumps(entry))
    assert reply.status_code == 200, reply.text
    received = reply.headers["x-echo-received"]  # what the XML upstream got
    assert received.startswith('<?xml version="1.0" encoding="UTF-8"?>\\n<entry ')  # the echo escapes \n
    assert "<id>7</id><amount>12.5</amount><tags>a</tags><tags>b</tags>" in received
    assert '<lines json:array="true"><sku>x</sku></lines>' in received
    # the XML answer comes back as the very same JSON
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == entry
    framed_correctly(reply)


def test_the_xml_upstream_is_asked_for_xml(client: httpx.Client) -> None:
    reply = client.get("/ledger/entries/7", headers={"accept": "application/json"})
    assert reply.status_code == 200
    # the echo answered JSON (it is no real XML service), passed through untranslated
    assert reply.json()["headers"]["accept"] == "application/xml"


def test_invalid_json_from_a_client_is_400(client: httpx.Client) -> None:
    reply = client.post("/ledger/entries", headers={"content-type": "application/json"}, content=b'{"id": ')
    json_error(reply, 400, "invalid_json")


@pytest.mark.parametrize("body", [b'{"id": "\\ud800"}', b'{"\\udfff": 1}'], ids=["value", "key"])
def test_a_lone_surrogate_for_the_xml_upstream_is_400(client: httpx.Client, body: bytes) -> None:
    reply = client.post("/ledger/entries", headers={"content-type": "application/json"}, content=body)
    json_error(reply, 400, "invalid_json")


def test_invalid_xml_from_the_upstream_is_502(client: httpx.Client) -> None:
    # the reflecting echo answers the XML it was sent: malformed XML from the upstream
    headers = {**XML_TYPE, **REFLECT}
    reply = client.post("/ledger/entries", headers=headers, content=b"<entry><id>7</entry>")
    json_error(reply, 502, "bad_upstream_body")


# -- REST/JSON clients of a gRPC service -------------------------------------------------------


def test_get_with_a_path_parameter(client: httpx.Client) -> None:
    reply = client.get("/orders/o-1")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    order = reply.json()
    assert order["id"] == "o-1"
    assert order["customer"] == "ada"
    assert order["items"] == [{"sku": "bolt", "quantity": 3, "priceCents": "25"}]
    assert order["totalCents"] == "75"  # int64 is a string in proto3 JSON
    assert order["status"] == "STATUS_PAID"
    assert "grpc-status" not in reply.headers
    framed_correctly(reply)


def test_query_parameters_fill_fields(client: httpx.Client) -> None:
    reply = client.get("/orders", params={"customer": "grace", "page_size": "5"})
    assert reply.status_code == 200, reply.text
    assert [o["id"] for o in reply.json()["orders"]] == ["o-2"]


def test_post_with_a_body(client: httpx.Client) -> None:
    order = {"id": "o-new", "customer": "linus", "items": [{"sku": "gear", "quantity": 2, "priceCents": 150}]}
    reply = client.post("/orders", json=order)
    assert reply.status_code == 200, reply.text
    assert reply.json()["totalCents"] == "300"
    assert client.get("/orders/o-new").json()["customer"] == "linus"


def test_path_query_and_body_in_one_call(client: httpx.Client) -> None:
    reply = client.patch(
        "/orders/o-2", params={"notify": "true"}, json={"note": "leave at door", "labels": {"gift": "yes"}}
    )
    assert reply.status_code == 200, reply.text
    order = reply.json()
    assert order["id"] == "o-2"
    assert order["note"] == "leave at door (customer notified)"
    assert order["labels"] == {"gift": "yes"}
    assert order["revision"] == 2


def test_a_configured_route_beside_the_annotations(client: httpx.Client) -> None:
    reply = client.post("/orders/o-2:ship", json={"order": {"status": "STATUS_SHIPPED"}, "expectedRevision": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "STATUS_SHIPPED"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("GET", "/orders/o-missing", None, 404, "not_found"),  # NOT_FOUND
        ("POST", "/orders", {"items": []}, 400, "invalid_argument"),  # INVALID_ARGUMENT
        ("POST", "/orders", {"id": "o-1", "customer": "x"}, 409, "already_exists"),  # ALREADY_EXISTS
        ("PATCH", "/orders/o-1?expected_revision=9", {}, 400, "failed_precondition"),  # FAILED_PRECONDITION
    ],
)
def test_grpc_errors_map_to_http_statuses_and_json(
    client: httpx.Client, method: str, path: str, body: object, status: int, error: str
) -> None:
    reply = client.request(method, path, json=body)
    result = json_error(reply, status, error)
    assert isinstance(result["grpc_status"], int)
    assert result["message"]


@pytest.mark.parametrize(
    ("request_args", "status", "error"),
    [
        (
            {
                "method": "POST",
                "url": "/orders",
                "content": b"{not json",
                "headers": {"content-type": "application/json"},
            },
            400,
            "invalid_json",
        ),
        (
            {
                "method": "POST",
                "url": "/orders",
                "content": b"<order/>",
                "headers": {"content-type": "application/xml"},
            },
            415,
            "unsupported_media_type",
        ),
        ({"method": "POST", "url": "/orders", "json": {"customer": 7}}, 400, "invalid_body"),
        ({"method": "GET", "url": "/orders", "params": {"page_size": "many"}}, 400, "invalid_argument"),
        ({"method": "GET", "url": "/orders", "params": {"colour": "red"}}, 400, "invalid_argument"),
        ({"method": "PUT", "url": "/orders/o-1", "json": {}}, 405, "method_not_allowed"),
        ({"method": "GET", "url": "/orders/o-1/items"}, 404, "not_found"),
        ({"method": "POST", "url": "/orders", "json": {"note": "x" * 5000}}, 413, "body_too_large"),
    ],
    ids=["bad-json", "not-json", "wrong-type", "bad-integer", "unknown-query", "wrong-method", "no-route", "too-large"],
)
def test_client_mistakes_are_4xx_json(
    client: httpx.Client, request_args: dict[str, object], status: int, error: str
) -> None:
    reply = client.request(**request_args)  # type: ignore[arg-type]
    json_error(reply, status, error)


def test_a_reply_larger_than_envoys_buffer_is_502_json(client: httpx.Client) -> None:
    for _ in range(20):  # 20 orders of 60 KB: listing them all is over 1 MiB
        assert client.post("/bulk/orders", json={"customer": "bulk", "note": "n" * 60_000}).status_code == 200
    reply = client.get("/bulk/orders", params={"customer": "bulk"})
    json_error(reply, 502, "upstream_body_too_large")
    reply = client.get("/bulk/orders", params={"customer": "bulk", "page_size": "3"})
    assert reply.status_code == 200
    assert len(reply.json()["orders"]) == 3


def test_grpc_translation_over_http2_and_tls(translating: Gateway) -> None:
    with translating.https() as https:
        reply = https.get("/orders/o-1")
    assert reply.http_version == "HTTP/2"
    assert reply.status_code == 200
    assert reply.json()["id"] == "o-1"


# -- the same service through Envoy's own grpc_json_transcoder (engine: envoy) ---------------------


def test_native_transcoding_answers_as_extproc_does(client: httpx.Client) -> None:
    through_extproc = client.get("/orders/o-1")
    native = client.get("/native/orders/o-1")
    assert native.status_code == 200, native.text
    assert native.headers["content-type"] == "application/json"
    assert native.json() == through_extproc.json()  # every field printed, int64 as strings
    assert not [name for name in native.headers if name.startswith("grpc-")]
    listed = client.get("/native/orders", params={"customer": "grace", "page_size": "5"})
    assert [o["id"] for o in listed.json()["orders"]] == ["o-2"]


def test_native_body_path_query_and_a_configured_route(client: httpx.Client) -> None:
    order = {"id": "o-native", "customer": "linus", "items": [{"sku": "gear", "quantity": 2, "priceCents": 150}]}
    created = client.post("/native/orders", json=order)
    assert created.status_code == 200, created.text
    assert created.json()["totalCents"] == "300"
    patched = client.patch("/native/orders/o-native", params={"notify": "true"}, json={"note": "door"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["note"] == "door (customer notified)"
    shipped = client.post(
        "/native/orders/o-native:ship", json={"order": {"status": "STATUS_SHIPPED"}, "expectedRevision": 2}
    )
    assert shipped.status_code == 200, shipped.text  # a route from gateway.yaml, not the proto
    assert shipped.json()["status"] == "STATUS_SHIPPED"


def test_native_grpc_errors_keep_their_http_status(client: httpx.Client) -> None:
    reply = client.get("/native/orders/o-missing")
    assert reply.status_code == 404
    assert reply.json() == {"code": 5, "message": "no order 'o-missing'", "details": []}  # google.rpc.Status
    assert client.post("/native/orders", json={"id": "o-1", "customer": "x"}).status_code == 409


@pytest.mark.parametrize(
    ("request_args", "status", "error"),
    [
        ({"method": "POST", "url": "/native/orders", "content": b"{not json"}, 400, "invalid_request"),
        ({"method": "POST", "url": "/native/orders", "json": {"customer": 7}}, 400, "invalid_request"),
        ({"method": "GET", "url": "/native/orders", "params": {"colour": "red"}}, 400, "invalid_request"),
        ({"method": "GET", "url": "/native/orders/o-1/items"}, 404, "not_found"),
        ({"method": "POST", "url": "/native/orders", "json": {"note": "x" * 5000}}, 413, "body_too_large"),
    ],
    ids=["bad-json", "wrong-type", "unknown-query", "no-route", "too-large"],
)
def test_native_refusals_are_json(
    client: httpx.Client, request_args: dict[str, object], status: int, error: str
) -> None:
    reply = client.request(**request_args)  # type: ignore[arg-type]
    assert json_error(reply, status, error)["message"]


# -- only translating routes call ext_proc ------------------------------------------------------


def test_only_translating_routes_call_ext_proc(translating: Gateway, client: httpx.Client) -> None:
    before = translating.stat(EXTPROC_CALLS)
    for _ in range(5):
        assert client.post("/plain/x", json={"a": 1}).status_code == 200
    assert translating.stat(EXTPROC_CALLS) == before
    assert client.get("/native/orders/o-1").status_code == 200  # Envoy transcodes it alone
    assert translating.stat(EXTPROC_CALLS) == before
    client.get("/orders/o-1")
    assert translating.stat(EXTPROC_CALLS) == before + 1


# -- sidegate up runs the demo gRPC upstream -----------------------------------------------------


def test_up_starts_the_demo_grpc_upstream_and_stops_it(tmp_path: Path) -> None:
    ports = {name: free_port() for name in PORTS} | {"grpc": free_port()}
    config = render_config(
        TEMPLATE.with_name("translate.yaml"), tmp_path / "gateway.yaml", protos=ROOT / "protos", **ports
    )
    argv = [sys.executable, "-m", "sidegate", "up", "--config", str(config), "--state-dir", str(tmp_path / "state")]
    argv += ["--echo", f"127.0.0.1:{ports['echo']}", "--workers", "1", "--admin-port", "0", "--metrics-port", "0"]
    out = tmp_path / "up.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Ctrl-C stops everything." in out.read_text(), timeout=30, what="sidegate up")
        assert f"demo gRPC upstream (sidegate.demo.v1.Orders): grpc://127.0.0.1:{ports['grpc']}" in out.read_text()
        reply = httpx.get(f"http://127.0.0.1:{ports['http']}/orders/o-1", timeout=10)
        assert reply.status_code == 200, reply.text
        assert reply.json()["customer"] == "ada"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert not grpc_serving(f"127.0.0.1:{ports['grpc']}")


def test_a_native_reply_larger_than_the_limit_is_refused_whole(client: httpx.Client) -> None:
    for _ in range(20):  # 20 orders of 60 KB, made through extproc's /bulk route (1 MiB bodies)
        assert client.post("/bulk/orders", json={"customer": "bulk-native", "note": "n" * 60_000}).status_code == 200
    reply = client.get("/native/orders", params={"customer": "bulk-native"})
    assert json_error(reply, 502, "upstream_body_too_large")["message"]
    assert client.get("/native/orders", params={"customer": "bulk-native", "page_size": "3"}).status_code == 200
