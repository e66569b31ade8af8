"""Protocol translation, pure: REST ⇄ gRPC routes, messages, framing and statuses; the ext_proc
sessions phase by phase (no sockets); what the compiler emits for translating APIs. Random input
is never anything but a 4xx (a client's) or 502 (an upstream's) JSON answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc import grpc_translate
from extproc.errors import Refusal
from extproc.grpc_translate import STATUS, compile_template, frame, status_error, unframe
from extproc.servicer import sessions
from extproc.session import TOO_LARGE, GrpcSession, Session
from extproc.translators import Versions, XmlClient, XmlUpstream, dump_json, load_json, strategies
from extproc.xml import from_xml
from sidegate import compiler, config
from sidegate.demo.v1 import orders_pb2
from tests.conftest import ROOT
from tests.unit.envoy_routes import EXTPROC, calls, in_force

GATEWAY = f"""
listeners: [{{name: http, port: 8080}}]
services:
  echo: {{endpoints: ["127.0.0.1:9080"]}}
  orders: {{endpoints: ["127.0.0.1:9090"], protocol: grpc}}
apis:
  - name: legacy
    match: {{prefix: /legacy}}
    service: echo
    auth: {{anonymous: true}}
    translate: {{xml: client, root: order, max_body_bytes: 1000}}
  - name: ledger
    match: {{prefix: /ledger}}
    service: echo
    auth: {{anonymous: true}}
    translate: {{xml: upstream}}
  - name: orders
    match: {{prefix: /orders}}
    service: orders
    auth: {{anonymous: true}}
    translate:
      max_body_bytes: 2000
      grpc:
        service: sidegate.demo.v1.Orders
        protos: [{ROOT}/protos/sidegate/demo/v1/orders.proto]
        proto_path: [{ROOT}/protos]
        routes:
          - {{method: POST, path: "/orders/{{id}}:ship", rpc: UpdateOrder, body: "*"}}
          - {{method: GET, path: "/orders/{{id}}", rpc: DeleteOrder}}
  - name: plain
    match: {{prefix: /plain}}
    service: echo
    auth: {{anonymous: true}}
"""


@pytest.fixture(scope="module")
def gateway() -> config.Gateway:
    return config.parse(GATEWAY, str(ROOT / "gw.yaml"))


@pytest.fixture(scope="module")
def translator(gateway: config.Gateway) -> grpc_translate.Translator:
    api = gateway.api("orders")
    assert api is not None
    assert api.translate is not None
    assert api.translate.grpc is not None
    return grpc_translate.load(api.translate.grpc, ROOT, api.translate.max_body_bytes)


# -- templates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "path", "variables"),
    [
        ("/orders", "/orders", {}),
        ("/orders/{id}", "/orders/o-1", {"id": "o-1"}),
        ("/orders/{id}:cancel", "/orders/a:b:cancel", {"id": "a:b"}),
        ("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2", {"name": "shelves/1/books/2"}),
        ("/files/{path=**}", "/files/a/b/c.txt", {"path": "a/b/c.txt"}),
        ("/a/*/b/{x.y}", "/a/any/b/7", {"x.y": "7"}),
    ],
)
def test_templates_match_and_capture(template: str, path: str, variables: dict[str, str]) -> None:
    pattern, fields = compile_template(template)
    m = pattern.match(path)
    assert m is not None
    assert {name: m.group(f"v{i}") for i, name in enumerate(fields)} == variables


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ("/orders/{id}", "/orders/a/b"),
        ("/orders/{id}", "/orders/"),
        ("/orders/{id}:cancel", "/orders/1"),
        ("/orders", "/ordersx"),
    ],
)
def test_templates_do_not_match_beyond_themselves(template: str, path: str) -> None:
    assert compile_template(template)[0].match(path) is None


@pytest.mark.parametrize("template", ["orders", "/orders/{id", "/orders/{1d}", "/orders/x{id}", "/a//b"])
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message is pinned by the bad-config tests
        compile_template(template)


# -- routes, requests, responses -----------------------------------------------------------------


def test_routes_come_from_config_first_then_annotations(translator: grpc_translate.Translator) -> None:
    routes = [(r.method, r.template, r.rpc, r.body) for r in translator.routes]
    assert routes == [
        ("POST", "/orders/{id}:ship", "UpdateOrder", "*"),
        ("GET", "/orders/{id}", "DeleteOrder", None),  # the configured route wins over GetOrder's annotation
        ("GET", "/orders", "ListOrders", None),
        ("POST", "/orders", "CreateOrder", "order"),
        ("PATCH", "/orders/{id}", "UpdateOrder", "order"),
        ("DELETE", "/orders/{id}", "DeleteOrder", None),
    ]
    assert translator.routes[0].path == "/sidegate.demo.v1.Orders/UpdateOrder"


def _decode(data: bytes, cls: Any) -> Any:
    return cls.FromString(unframe(data))


def test_path_query_and_body_build_one_message(translator: grpc_translate.Translator) -> None:
    route, variables = translator.match("PATCH", "/orders/o%2F1")
    assert variables == {"id": "o/1"}  # percent-decoded
    body = {"customer": "ann", "items": [{"sku": "a", "quantity": 2}], "labels": {"k": "v"}}
    query = [("notify", "true"), ("expectedRevision", "3")]  # JSON names work as well as proto names
    message = _decode(translator.request(route, variables, query, body), orders_pb2.UpdateOrderRequest)
    assert message.id == "o/1"
    assert message.notify is True
    assert message.expected_revision == 3
    assert message.order.customer == "ann"
    assert message.order.items[0].quantity == 2
    assert dict(message.order.labels) == {"k": "v"}


def test_path_variables_win_over_the_body(translator: grpc_translate.Translator) -> None:
    route, variables = translator.match("POST", "/orders/o-9:ship")
    message = _decode(
        translator.request(route, variables, [], {"id": "other", "notify": True}), orders_pb2.UpdateOrderRequest
    )
    assert message.id == "o-9"
    assert message.notify is True


def test_query_parameters_fill_enums_and_nested_fields(translator: grpc_translate.Translator) -> None:
    route, variables = translator.match("GET", "/orders")
    query = [("status", "STATUS_PAID"), ("page_size", "2")]
    message = _decode(translator.request(route, variables, query, None), orders_pb2.ListOrdersRequest)
    assert message.status == orders_pb2.STATUS_PAID
    assert message.page_size == 2
    route, variables = translator.match("PATCH", "/orders/1")
    with pytest.raises(Refusal, match="not a field UpdateOrder takes there"):
        translator.request(route, variables, [("order.note", "x")], {})  # the body owns `order`


@pytest.mark.parametrize(
    ("method", "path", "query", "body", "status", "problem"),
    [
        ("GET", "/orders", [("page_size", "two")], None, 400, "is an integer"),
        ("GET", "/orders", [("page_size", "1"), ("page_size", "2")], None, 400, "given 2 times"),
        ("GET", "/orders", [("nope", "1")], None, 400, "has no field 'nope'"),
        ("PATCH", "/orders/1", [("notify", "perhaps")], {}, 400, "true or false"),
        ("POST", "/orders", [], {"customer": 5}, 400, "does not fit CreateOrderRequest"),
        ("POST", "/orders/1:ship", [], ["not", "an", "object"], 400, "is a JSON object"),
        ("POST", "/orders/1:ship", [("notify", "true")], {}, 400, "not a field"),
        ("PUT", "/orders/1", [], None, 405, "takes DELETE, GET, PATCH"),
        ("GET", "/elsewhere", [], None, 404, "no method of sidegate.demo.v1.Orders"),
    ],
)
def test_requests_that_do_not_fit_are_4xx(
    translator: grpc_translate.Translator,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    body: Any,
    status: int,
    problem: str,
) -> None:
    def call() -> bytes:
        route, variables = translator.match(method, path)
        return translator.request(route, variables, query, body)

    with pytest.raises(Refusal, match=problem) as info:
        call()
    assert info.value.status == status


def test_responses_are_proto3_json_with_every_field(translator: grpc_translate.Translator) -> None:
    route, _ = translator.match("POST", "/orders")
    reply = frame(orders_pb2.Order(id="o-1", customer="ada", total_cents=75).SerializeToString())
    assert json.loads(translator.response(route, reply)) == {
        "id": "o-1",
        "customer": "ada",
        "items": [],
        "status": "STATUS_UNSPECIFIED",
        "totalCents": "75",
        "labels": {},
        "revision": 0,
        "note": "",
    }


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "truncated gRPC frame"),
        (b"\x00\x00\x00\x00\x05abc", "truncated gRPC message"),
        (b"\x01\x00\x00\x00\x00", "compressed"),
        (frame(b"") + frame(b""), "more than one gRPC message"),
        (b"\x00\xff\xff\xff\xff", "larger than 4 MiB"),
        (frame(b"\xff\xff\xff"), "not a Order"),
    ],
)
def test_broken_replies_are_502(translator: grpc_translate.Translator, data: bytes, problem: str) -> None:
    route, _ = translator.match("POST", "/orders")
    with pytest.raises(Refusal, match=problem) as info:
        translator.response(route, data)
    assert info.value.status == 502


def test_every_grpc_status_maps_to_an_http_status() -> None:
    expected = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409, 11: 400,
                12: 501, 13: 500, 14: 503, 15: 500, 16: 401}  # fmt: skip
    assert {code: status for code, (status, _) in STATUS.items()} == expected
    error = status_error("5", "no%20order%20%27o-9%27")
    assert (error.status, error.code, error.message) == (404, "not_found", "no order 'o-9'")
    assert json.loads(error.body()) == {
        "error": "not_found",
        "message": "no order 'o-9'",
        "grpc_status": 5,
    }
    assert status_error("99", "").status == 500
    assert status_error("x", "").status == 502


# -- sessions, phase by phase ----------------------------------------------------------------------


def _headers(pairs: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])


def headers(pairs: dict[str, str], *, end: bool = False) -> pb.HttpHeaders:
    return pb.HttpHeaders(headers=_headers(pairs), end_of_stream=end)


def body(data: bytes, *, end: bool = False) -> pb.HttpBody:
    return pb.HttpBody(body=data, end_of_stream=end)


def trailers(pairs: dict[str, str]) -> pb.HttpTrailers:
    return pb.HttpTrailers(trailers=_headers(pairs))


def set_headers(mutation: Any) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def immediate(reply: Any) -> tuple[int, dict[str, Any]]:
    assert reply.WhichOneof("response") == "immediate_response", reply
    answer = reply.immediate_response
    assert set_headers(answer.headers)["content-type"] == "application/json"
    return answer.status.code, json.loads(answer.body)


def test_a_get_becomes_a_grpc_call_with_a_body_added(translator: grpc_translate.Translator) -> None:
    session = GrpcSession(translator)
    reply = session.handle("request_headers", headers({":method": "GET", ":path": "/orders?customer=ada"}, end=True))
    common = reply.request_headers.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    sent = set_headers(common.header_mutation)
    assert sent[":method"] == "POST"
    assert sent[":path"] == "/sidegate.demo.v1.Orders/ListOrders"
    assert sent["content-type"] == "application/grpc"
    assert sent["te"] == "trailers"
    assert sent["content-length"] == str(len(common.body_mutation.body))
    assert _decode(common.body_mutation.body, orders_pb2.ListOrdersRequest).customer == "ada"


def test_a_json_body_is_buffered_then_replaced_by_the_call(translator: grpc_translate.Translator) -> None:
    session = GrpcSession(translator)
    first = session.handle(
        "request_headers",
        headers(
            {
                ":method": "PATCH",
                ":path": "/orders/o-1?notify=1",
                "content-type": "application/json",
                "content-length": "20",
            }
        ),
    )
    assert first.mode_override.request_body_mode == first.mode_override.BUFFERED
    second = session.handle("request_body", body(b'{"note": "hi"}', end=True))
    common = second.request_body.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE  # Envoy keeps the :method otherwise
    assert set_headers(common.header_mutation)[":method"] == "POST"
    message = _decode(common.body_mutation.body, orders_pb2.UpdateOrderRequest)
    assert (message.id, message.notify, message.order.note) == ("o-1", True, "hi")


@pytest.mark.parametrize(
    ("request_headers", "status", "error"),
    [
        ({"content-type": "text/xml", "content-length": "5"}, 415, "unsupported_media_type"),
        ({"content-type": "application/json"}, 411, "length_required"),
        ({"content-type": "application/json", "content-length": "2001"}, 413, "body_too_large"),
    ],
)
def test_bodies_it_cannot_take_are_refused(
    translator: grpc_translate.Translator, request_headers: dict[str, str], status: int, error: str
) -> None:
    session = GrpcSession(translator)
    reply = session.handle("request_headers", headers({":method": "POST", ":path": "/orders", **request_headers}))
    assert immediate(reply)[0] == status
    assert immediate(reply)[1]["error"] == error


def test_a_reply_and_its_trailers_become_json(translator: grpc_translate.Translator) -> None:
    session = GrpcSession(translator)
    session.handle("request_headers", headers({":method": "GET", ":path": "/orders/o-1"}, end=True))
    first = session.handle("response_headers", headers({":status": "200", "content-type": "application/grpc"}))
    # a reply larger than Envoy's buffer reaches the session cut, rather than Envoy answering 500
    assert first.mode_override.response_body_mode == first.mode_override.BUFFERED_PARTIAL
    assert first.mode_override.response_trailer_mode == first.mode_override.SEND
    assert list(first.response_headers.response.header_mutation.remove_headers) == ["content-length"]
    second = session.handle("response_body", body(frame(b"")))
    common = second.response_body.response
    assert json.loads(common.body_mutation.body) == {}  # DeleteOrder (the configured route) answers Empty
    assert set_headers(common.header_mutation)["content-type"] == "application/json"
    third = session.handle("response_trailers", trailers({"grpc-status": "0"}))
    assert list(third.response_trailers.header_mutation.remove_headers) == ["grpc-status", "grpc-message"]


def test_errors_in_trailers_or_trailers_only_replies_are_mapped(translator: grpc_translate.Translator) -> None:
    session = GrpcSession(translator)
    session.handle("request_headers", headers({":method": "GET", ":path": "/orders"}, end=True))
    only = session.handle(
        "response_headers",
        headers(
            {":status": "200", "content-type": "application/grpc", "grpc-status": "7", "grpc-message": "no"}, end=True
        ),
    )
    assert immediate(only) == (403, {"error": "permission_denied", "message": "no", "grpc_status": 7})
    session = GrpcSession(translator)
    session.handle("request_headers", headers({":method": "GET", ":path": "/orders"}, end=True))
    session.handle("response_headers", headers({":status": "200", "content-type": "application/grpc"}))
    assert session.handle("response_body", body(b"")) == pb.ProcessingResponse(response_body=pb.BodyResponse())
    late = session.handle("response_trailers", trailers({"grpc-status": "8", "grpc-message": "slow%20down"}))
    assert immediate(late) == (429, {"error": "resource_exhausted", "message": "slow down", "grpc_status": 8})


@pytest.mark.parametrize(
    ("phase", "message", "status"),
    [
        (
            "response_headers",
            headers({":status": "200", "content-type": "application/grpc", "grpc-status": "0"}, end=True),
            502,
        ),
        ("response_headers", headers({":status": "503", "content-type": "text/plain"}), 503),
        ("response_headers", headers({":status": "504", "content-type": "text/plain"}), 504),
        ("response_headers", headers({":status": "200", "content-type": "text/html"}), 502),
        ("response_headers", headers({":status": "200", "content-type": "application/grpc"}, end=True), 502),
        ("response_body", body(frame(b""), end=True), 502),
        ("response_trailers", trailers({}), 502),
        ("response_trailers", trailers({"grpc-status": "0"}), 502),  # OK, but no message came
    ],
)
def test_upstream_protocol_errors_are_5xx_json(
    translator: grpc_translate.Translator, phase: str, message: Any, status: int
) -> None:
    session = GrpcSession(translator)
    session.handle("request_headers", headers({":method": "GET", ":path": "/orders"}, end=True))
    assert immediate(session.handle(phase, message))[0] == status


@given(st.binary(max_size=300))
def test_random_request_bodies_are_400_json(translator: grpc_translate.Translator, data: bytes) -> None:
    session = GrpcSession(translator)
    session.handle(
        "request_headers",
        headers(
            {
                ":method": "POST",
                ":path": "/orders",
                "content-type": "application/json",
                "content-length": str(len(data) or 1),
            }
        ),
    )
    reply = session.handle("request_body", body(data, end=True))
    if reply.WhichOneof("response") == "immediate_response":
        assert immediate(reply)[0] == 400
    else:
        assert reply.request_body.response.status == pb.CommonResponse.CONTINUE_AND_REPLACE


@given(st.binary(max_size=300))
def test_random_reply_bodies_are_502_json(translator: grpc_translate.Translator, data: bytes) -> None:
    session = GrpcSession(translator)
    session.handle("request_headers", headers({":method": "GET", ":path": "/orders"}, end=True))
    reply = session.handle("response_body", body(data))
    if reply.WhichOneof("response") == "immediate_response":
        assert immediate(reply)[0] == 502
    else:
        assert (
            reply.response_body == pb.BodyResponse()
            or json.loads(reply.response_body.response.body_mutation.body) is not None
        )


# -- XML sessions ------------------------------------------------------------------------------------


def test_an_xml_client_sends_json_upstream_and_gets_xml_back(gateway: config.Gateway) -> None:
    strategy = strategies(gateway)["legacy"]
    assert isinstance(strategy, XmlClient)
    session = Session(strategy)
    xml = b"<order><id>7</id></order>"
    first = session.handle(
        "request_headers",
        headers({"content-type": "application/xml", "content-length": str(len(xml)), "accept": "application/xml"}),
    )
    assert first.mode_override.request_body_mode == first.mode_override.BUFFERED
    assert set_headers(first.request_headers.response.header_mutation) == {"accept": "application/json"}
    second = session.handle("request_body", body(xml, end=True))
    common = second.request_body.response
    assert json.loads(common.body_mutation.body) == {"id": 7}
    assert set_headers(common.header_mutation) == {"content-type": "application/json", "content-length": "8"}
    third = session.handle(
        "response_headers", headers({":status": "200", "content-type": "application/json", "content-length": "8"})
    )
    assert list(third.response_headers.response.header_mutation.remove_headers) == ["content-length"]
    fourth = session.handle("response_body", body(b'{"id":7}', end=True))
    common = fourth.response_body.response
    assert common.body_mutation.body.endswith(b"<order><id>7</id></order>")
    assert set_headers(common.header_mutation)["content-type"] == "application/xml"


def test_json_clients_of_an_xml_client_api_are_not_buffered(gateway: config.Gateway) -> None:
    session = Session(strategies(gateway)["legacy"])
    plain = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    assert (
        session.handle("request_headers", headers({"content-type": "application/json", "content-length": "2"})) == plain
    )
    assert session.handle(
        "response_headers", headers({"content-type": "application/json", "content-length": "2"})
    ) == pb.ProcessingResponse(response_headers=pb.HeadersResponse())


def test_a_json_client_of_an_xml_service(gateway: config.Gateway) -> None:
    strategy = strategies(gateway)["ledger"]
    assert isinstance(strategy, XmlUpstream)
    session = Session(strategy)
    session.handle("request_headers", headers({"content-type": "application/json", "content-length": "9"}))
    up = session.handle("request_body", body(b'{"a": [1]}', end=True)).request_body.response
    assert from_xml(up.body_mutation.body) == {"a": [1]}
    assert set_headers(up.header_mutation)["content-type"] == "application/xml"
    # an XML answer without a content-length is still translated (Envoy buffers what fits)
    down = session.handle("response_headers", headers({"content-type": "text/xml"}))
    assert down.mode_override.response_body_mode == down.mode_override.BUFFERED_PARTIAL
    answer = session.handle("response_body", body(b"<r><b>x</b></r>", end=True)).response_body.response
    assert json.loads(answer.body_mutation.body) == {"b": "x"}


def test_an_answer_cut_at_envoys_buffer_is_502(gateway: config.Gateway, translator: grpc_translate.Translator) -> None:
    session = Session(strategies(gateway)["ledger"])
    session.handle("request_headers", headers({"content-type": "application/json"}, end=True))
    session.handle("response_headers", headers({"content-type": "application/xml"}))
    cut = session.handle("response_body", body(b"<r><b>x</b>", end=False))
    assert immediate(cut)[1]["error"] == "upstream_body_too_large"
    grpc_session = GrpcSession(translator)
    grpc_session.handle("request_headers", headers({":method": "GET", ":path": "/orders"}, end=True))
    grpc_session.handle("response_headers", headers({":status": "200", "content-type": "application/grpc"}))
    cut = grpc_session.handle("response_body", body(b"\x00\x00\x20\x00\x00" + b"x" * 100))
    assert immediate(cut) == (502, {"error": "upstream_body_too_large", "message": TOO_LARGE})


def test_xml_body_limits(gateway: config.Gateway) -> None:
    session = Session(strategies(gateway)["legacy"])
    assert (
        immediate(
            session.handle("request_headers", headers({"content-type": "application/xml", "content-length": "1001"}))
        )[0]
        == 413
    )
    assert immediate(session.handle("request_headers", headers({"content-type": "application/xml"})))[0] == 411
    session = Session(strategies(gateway)["legacy"])
    session.handle("request_headers", headers({"content-type": "application/xml", "content-length": "3"}))
    too_large = session.handle(
        "response_headers", headers({"content-type": "application/json", "content-length": "1001"})
    )
    assert immediate(too_large) == (
        502,
        {"error": "upstream_body_too_large", "message": "the upstream's answer is too large to translate"},
    )


@given(st.binary(max_size=300))
def test_random_xml_request_bodies_are_400_json(gateway: config.Gateway, data: bytes) -> None:
    session = Session(strategies(gateway)["legacy"])
    session.handle(
        "request_headers", headers({"content-type": "application/xml", "content-length": str(len(data) or 1)})
    )
    reply = session.handle("request_body", body(data, end=True))
    if reply.WhichOneof("response") == "immediate_response":
        status, error = immediate(reply)
        assert (status, error["error"]) == (400, "invalid_xml")
    else:
        json.loads(reply.request_body.response.body_mutation.body)


@given(st.binary(max_size=300))
def test_random_upstream_bodies_are_502_json(gateway: config.Gateway, data: bytes) -> None:
    for name, media in (("legacy", "application/json"), ("ledger", "application/xml")):
        session = Session(strategies(gateway)[name])
        session.handle(
            "request_headers", headers({"content-type": "application/xml", "accept": "application/xml"}, end=True)
        )
        session.handle("response_headers", headers({"content-type": media, "content-length": str(len(data) or 1)}))
        reply = session.handle("response_body", body(data, end=True))
        if reply.WhichOneof("response") == "immediate_response":
            assert immediate(reply)[0] == 502


# -- wiring ------------------------------------------------------------------------------------------


def test_only_translating_routes_turn_ext_proc_on(gateway: config.Gateway) -> None:
    bootstrap = compiler.compile_bootstrap(gateway)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    host = hcm["route_config"]["virtual_hosts"][0]
    routes = {r["name"]: r for r in host["routes"]}
    (listener,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == EXTPROC]
    assert listener["processing_mode"]["request_body_mode"] == "NONE"  # the session asks
    for name in ("legacy", "ledger", "orders"):
        extproc = in_force(host, routes[name], EXTPROC)
        assert extproc is not None
        assert extproc["overrides"]["grpc_initial_metadata"] == [{"key": "x-sidegate-route", "value": name}]
        assert extproc["overrides"]["processing_mode"]["response_header_mode"] == "SEND"
    assert not calls(host, routes["plain"], EXTPROC)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    assert "typed_extension_protocol_options" in clusters["svc_orders"]  # HTTP/2 to the gRPC service


def test_the_servicer_has_a_session_for_each_translating_route(gateway: config.Gateway) -> None:
    factories = sessions(gateway, ROOT)
    assert sorted(factories) == ["ledger", "legacy", "orders"]
    assert isinstance(factories["orders"](), GrpcSession)
    assert isinstance(factories["legacy"](), Session)


def test_descriptor_sets_from_sidegate_descriptors_load_too(tmp_path: Path) -> None:
    from sidegate.cli import main  # noqa: PLC0415

    out = tmp_path / "orders.pb"
    assert (
        main(
            [
                "descriptors",
                "-I",
                str(ROOT / "protos"),
                str(ROOT / "protos/sidegate/demo/v1/orders.proto"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    spec = config.GrpcTranslation.model_validate({"service": "sidegate.demo.v1.Orders", "descriptor": "orders.pb"})
    translator = grpc_translate.load(spec, tmp_path)
    assert [r.rpc for r in translator.routes] == ["GetOrder", "ListOrders", "CreateOrder", "UpdateOrder", "DeleteOrder"]


def test_the_translation_example_loads_and_compiles() -> None:
    example = config.load(ROOT / "examples" / "translate.yaml")
    bootstrap = compiler.compile_bootstrap(example)
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [r["name"] for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if ":key_in_query" not in r["name"]]
    assert names == ["legacy", "ledger", "orders", "not_found"]
    assert sorted(sessions(example, ROOT / "examples")) == ["ledger", "legacy", "orders"]


# --- JSON bodies: orjson, with the standard library's answers where orjson has none ----------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
@settings(deadline=None)
def test_json_bodies_read_and_write_as_the_standard_library_does(doc: Any) -> None:
    try:
        written = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 body can carry it either way
        return
    assert load_json(written) == json.loads(written)
    assert json.loads(dump_json(doc)) == json.loads(written)  # floats may be spelled otherwise


def test_json_bodies_orjson_cannot_write_are_written_by_the_standard_library() -> None:
    huge = 2**70 + 1  # past 64 bits
    assert load_json(b'{"n": %d}' % huge) == {"n": huge}
    assert dump_json({"n": huge, "m": [-huge]}) == b'{"n":%d,"m":[-%d]}' % (huge, huge)
    assert dump_json({1: "one"}) == b'{"1":"one"}'


@pytest.mark.parametrize("body", [b'{"amount": 1e400}', b"[-1e999]", b'{"a": {"b": 1.5e309}}'])
def test_a_number_no_double_holds_is_refused_not_changed(body: bytes) -> None:
    with pytest.raises(ValueError, match="out of range"):
        load_json(body)
    found = strategies(config.parse((ROOT / "examples" / "gateway.yaml").read_text())).values()
    strategy = next(s for s in found if isinstance(s, Versions))
    with pytest.raises(Refusal) as refused:  # a client's: 400, not a number changed on its way up
        strategy.request(body)
    assert (refused.value.status, refused.value.code) == (400, "invalid_json")
    assert strategy.response(body) is None  # an upstream's: passed on as it came, never rewritten
