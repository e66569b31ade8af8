"""REST/JSON ⇄ gRPC in Envoy itself: an API whose ``translate.grpc.engine`` is ``envoy`` gets
Envoy's ``grpc_json_transcoder`` on its route instead of an ext_proc callout.

The descriptor set is the service's, compiled as extproc would load it, with the API's own
``routes`` written into its methods as ``google.api.http`` bindings, so Envoy and extproc
route the same requests. The listener holds the filter turned off; each native API's route
turns it on with its own service's descriptors, so no route transcodes for another.
"""

from __future__ import annotations

import base64
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from sidegate import config as model
from sidegate import protoc
from sidegate.compiler.envoy import TYPE, cel
from sidegate.config import Api, Gateway, GrpcRoute, GrpcTranslation

FILTER_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
# What the transcoder's own refusals (a body that is no JSON of the message, an unknown path
# or query parameter, a body over the limit) are called in the JSON error bodies.
FAILURE_DETAILS = "grpc_json_transcode_failure"
# Envoy's status → (the error's name, the status the client gets). A reply over the buffer is
# Envoy's 500; to the client it is the upstream's fault (502), as extproc says it.
REFUSALS = {
    400: ("invalid_request", 400),
    404: ("not_found", 404),
    413: ("body_too_large", 413),
    500: ("upstream_body_too_large", 502),
}
# A gRPC reply's own headers, which a REST client has no use for.
GRPC_HEADERS = ("grpc-status", "grpc-message", "grpc-accept-encoding", "grpc-encoding", "grpc-status-details-bin")
MAX_BODY = 1024 * 1024  # Envoy's buffer, as for extproc's translations


def native(api: Api) -> GrpcTranslation | None:
    """The API's gRPC translation when Envoy does it, else None."""
    spec = api.translate.grpc if api.translate is not None else None
    return spec if spec is not None and spec.engine == "envoy" else None


def _descriptors(api: Api, spec: GrpcTranslation, gateway: Gateway) -> descriptor_pb2.FileDescriptorSet:
    """The API's descriptor set; a ``ConfigError`` at its ``descriptor``/``protos`` line if unreadable."""
    try:
        return protoc.service_set(spec.descriptor, spec.protos, spec.proto_path, gateway.base)
    except protoc.ProtoError as exc:
        key = "descriptor" if spec.descriptor is not None else "protos"
        model.verify(gateway, [(("apis", gateway.apis.index(api), "translate", "grpc", key), str(exc))])
        raise  # verify raised already


def _binding(route: GrpcRoute) -> http_pb2.HttpRule:
    rule = http_pb2.HttpRule(body=route.body or "")
    method = route.method.lower()
    if method in ("get", "put", "post", "delete", "patch"):
        setattr(rule, method, route.path)
    else:
        rule.custom.kind, rule.custom.path = route.method, route.path
    return rule


def with_routes(files: descriptor_pb2.FileDescriptorSet, service: str, routes: tuple[GrpcRoute, ...]) -> bytes:
    """``files`` serialized, ``routes`` added to ``service``'s methods as HTTP bindings."""
    if not routes:
        return files.SerializeToString()
    package, _, name = service.rpartition(".")
    out = descriptor_pb2.FileDescriptorSet()
    out.CopyFrom(files)
    for proto in out.file:
        if proto.package != package:
            continue
        for declared in proto.service:
            if declared.name != name:
                continue
            methods = {m.name: m for m in declared.method}
            for route in routes:
                method = methods.get(route.rpc)
                if method is None:
                    continue  # sidegate check names it (extproc.grpc_translate.problems)
                http = method.options.Extensions[annotations_pb2.http]
                if http.WhichOneof("pattern") is None:
                    http.CopyFrom(_binding(route))
                else:
                    http.additional_bindings.append(_binding(route))
    return out.SerializeToString()


def config(api: Api, spec: GrpcTranslation, gateway: Gateway) -> dict[str, Any]:
    """The transcoder's config for a native API's route (``spec``: its ``translate.grpc``)."""
    files = _descriptors(api, spec, gateway)
    limit = api.translate.max_body_bytes if api.translate is not None else MAX_BODY
    return {
        "@type": TYPE + "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        "proto_descriptor_bin": base64.b64encode(with_routes(files, spec.service, spec.routes)).decode(),
        "services": [spec.service],
        # The route was chosen by the REST path; the gRPC path it becomes matches no route.
        "match_incoming_request_route": True,
        "convert_grpc_status": True,
        "print_options": {"always_print_primitive_fields": True},
        # Like extproc: what no route names is a 404, a query parameter no field takes a 400.
        "request_validation_options": {"reject_unknown_method": True, "reject_unknown_query_parameters": True},
        "max_request_body_size": limit,
        "max_response_body_size": MAX_BODY,
    }


def http_filter(gateway: Gateway) -> dict[str, Any] | None:
    """The listener's transcoder, off until a native API's route turns it on; None if none does."""
    for api in gateway.apis:
        spec = native(api)
        if spec is not None:
            return {"name": FILTER_TRANSCODER, "disabled": True, "typed_config": config(api, spec, gateway)}
    return None


def local_replies(gateway: Gateway) -> list[dict[str, Any]]:
    """Local-reply mappers giving the transcoder's own refusals (text/plain from Envoy) the
    gateway's JSON error body, ``{"error": …, "message": <Envoy's words>}``."""
    if not any(native(api) for api in gateway.apis):
        return []
    return [
        {
            "filter": cel(f"response.code == {status} && response.code_details.contains('{FAILURE_DETAILS}')"),
            "status_code": answer,
            "body_format_override": {"json_format": {"error": error, "message": "%LOCAL_REPLY_BODY%"}},
        }
        for status, (error, answer) in REFUSALS.items()
    ]


def strip_grpc_headers() -> dict[str, Any]:
    """A native route's per-route header mutation: the gRPC reply's own headers, which the
    transcoder leaves on the REST answer, are removed (on the way out, after the transcoder)."""
    return {
        "@type": TYPE + "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
        "mutations": {"response_mutations": [{"remove": name} for name in GRPC_HEADERS]},
    }
