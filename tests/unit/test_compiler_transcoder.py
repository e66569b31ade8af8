"""``translate.grpc.engine: envoy``: the API's route gets Envoy's grpc_json_transcoder with its own
service's descriptors (gateway.yaml's routes written in as HTTP bindings), no ext_proc, and the
transcoder's refusals get JSON bodies. The e2e proof is tests/e2e/test_translate.py's native tests."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, empty_pb2

from sidegate import compiler, config
from sidegate.demo.v1 import orders_pb2
from tests.unit import envoy_routes

T = "type.googleapis.com/"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


def _descriptor_set(path: Path) -> None:
    files = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, http_pb2, annotations_pb2, empty_pb2, orders_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    path.write_bytes(files.SerializeToString())


def _gateway(tmp_path: Path, engine: str, routes: list[dict[str, Any]] | None = None) -> config.Gateway:
    _descriptor_set(tmp_path / "orders.pb")
    grpc = {"engine": engine, "service": "sidegate.demo.v1.Orders", "descriptor": "orders.pb", "routes": routes or []}
    doc = {
        "listeners": [{"name": "http", "port": 8080}],
        "services": {"orders": {"endpoints": ["127.0.0.1:9090"], "protocol": "grpc"}},
        "apis": [
            {"name": "orders", "match": {"prefix": "/orders"}, "service": "orders", "auth": {"anonymous": True}},
            {
                "name": "native",
                "match": {"prefix": "/native"},
                "service": "orders",
                "auth": {"anonymous": True},
                "translate": {"grpc": grpc, "max_body_bytes": 4096},
            },
        ],
    }
    return config.parse(yaml.safe_dump(doc, sort_keys=False), str(tmp_path / "gateway.yaml"))


def _hcm(gateway: config.Gateway) -> dict[str, Any]:
    listener = compiler.compile_bootstrap(gateway, state_dir=".sidegate")["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def _route(hcm: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == name)


def test_a_native_api_gets_the_transcoder_and_no_ext_proc(tmp_path: Path) -> None:
    hcm = _hcm(_gateway(tmp_path, "envoy"))
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index(TRANSCODER) == len(names) - 2  # just before the router
    assert next(f for f in hcm["http_filters"] if f["name"] == TRANSCODER)["disabled"] is True
    host = hcm["route_config"]["virtual_hosts"][0]
    assert not envoy_routes.calls(host, _route(hcm, "native"), "envoy.filters.http.ext_proc")
    native = _route(hcm, "native")["typed_per_filter_config"]
    transcoding = native[TRANSCODER]
    assert transcoding["services"] == ["sidegate.demo.v1.Orders"]
    assert transcoding["match_incoming_request_route"] is True  # else the gRPC path matches no route
    assert transcoding["max_request_body_size"] == 4096
    assert transcoding["request_validation_options"]["reject_unknown_method"] is True
    stripped = native["envoy.filters.http.header_mutation"]["mutations"]["response_mutations"]
    assert {"remove": "grpc-status"} in stripped
    assert envoy_routes.in_force(host, _route(hcm, "orders"), TRANSCODER) is None  # off elsewhere
    errors = {m["body_format_override"]["json_format"]["error"] for m in hcm["local_reply_config"]["mappers"]}
    edge = {"sidecar_unavailable", "request_header_fields_too_large"}  # every listener's own
    assert errors - edge == {"invalid_request", "not_found", "body_too_large", "upstream_body_too_large"}


def test_gateway_routes_become_http_bindings_in_the_descriptors(tmp_path: Path) -> None:
    routes = [
        {"method": "GET", "path": "/native/orders/{id}", "rpc": "GetOrder"},
        {"method": "POST", "path": "/native/orders/{id}:ship", "rpc": "UpdateOrder", "body": "*"},
    ]
    hcm = _hcm(_gateway(tmp_path, "envoy", routes))
    data = base64.b64decode(_route(hcm, "native")["typed_per_filter_config"][TRANSCODER]["proto_descriptor_bin"])
    files = descriptor_pb2.FileDescriptorSet.FromString(data)
    orders = next(f for f in files.file if f.package == "sidegate.demo.v1")
    methods = {m.name: m.options.Extensions[annotations_pb2.http] for m in orders.service[0].method}
    assert methods["GetOrder"].get == "/orders/{id}"  # the proto's own annotation stays
    assert [b.get for b in methods["GetOrder"].additional_bindings] == ["/native/orders/{id}"]
    ship = methods["UpdateOrder"].additional_bindings[0]
    assert (ship.post, ship.body) == ("/native/orders/{id}:ship", "*")


def test_the_extproc_engine_keeps_the_callout_and_adds_no_transcoder(tmp_path: Path) -> None:
    hcm = _hcm(_gateway(tmp_path, "extproc"))
    assert TRANSCODER not in [f["name"] for f in hcm["http_filters"]]
    host = hcm["route_config"]["virtual_hosts"][0]
    assert envoy_routes.calls(host, _route(hcm, "native"), "envoy.filters.http.ext_proc")
    assert len(hcm["local_reply_config"]["mappers"]) == 3  # header limits (two), sidecar_unavailable


def test_an_unreadable_descriptor_names_its_line(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path, "envoy")
    (tmp_path / "orders.pb").write_bytes(b"not a descriptor set")
    with pytest.raises(config.ConfigError, match=r"gateway.yaml:\d+: apis\[1\]\.translate\.grpc\.descriptor: "):
        _hcm(gateway)
