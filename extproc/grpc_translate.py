"""REST/JSON ⇄ gRPC, pure: routes, JSON ⇄ protobuf, gRPC framing, status mapping. No grpc, no I/O
beyond reading the descriptors once.

A translated API is a gRPC service described by a FileDescriptorSet (given, or compiled from
``.proto`` files by ``sidegate.protoc``). Its REST routes are the ``google.api.http``
annotations of its methods plus the routes in gateway.yaml (first). A route is an HTTP method
and a path template (``/orders/{id}``, ``/files/{path=**}``, ``/orders/{id}:cancel``); the
request message is built from the JSON body (``body: "*"`` — the whole message — or one
field), then the query parameters, then the path variables, each a field path of the request
(proto or JSON names). The message goes upstream as one gRPC frame (``0``, a 4-byte length,
the message); the one frame that comes back becomes proto3 JSON (lowerCamelCase names, every
field printed). ``grpc-status`` (from the trailers, or the headers of a trailers-only reply)
maps to the HTTP status the gRPC/HTTP mapping gives (NOT_FOUND → 404, …), with a JSON error
body. A client's mistake is a ``Refusal`` with a 4xx; an upstream that breaks the protocol
one with 502.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from extproc.errors import GrpcConfigError, Refusal
from sidegate import config, protoc
from sidegate.config import Gateway, GrpcRoute, GrpcTranslation

# gRPC status code → (HTTP status, error code), as google.rpc.Code documents the mapping.
STATUS: dict[int, tuple[int, str]] = {
    0: (200, "ok"),
    1: (499, "cancelled"),
    2: (500, "unknown"),
    3: (400, "invalid_argument"),
    4: (504, "deadline_exceeded"),
    5: (404, "not_found"),
    6: (409, "already_exists"),
    7: (403, "permission_denied"),
    8: (429, "resource_exhausted"),
    9: (400, "failed_precondition"),
    10: (409, "aborted"),
    11: (400, "out_of_range"),
    12: (501, "unimplemented"),
    13: (500, "internal"),
    14: (503, "unavailable"),
    15: (500, "data_loss"),
    16: (401, "unauthenticated"),
}
MAX_MESSAGE = 4 * 1024 * 1024  # the gRPC default receive limit
_HTTP_KINDS = ("get", "put", "post", "delete", "patch")


def status_error(grpc_status: str, grpc_message: str) -> Refusal:
    """``grpc-status`` and (percent-encoded) ``grpc-message`` → the error a REST client gets."""
    try:
        code = int(grpc_status)
    except ValueError:
        return Refusal(502, "bad_upstream_status", f"the upstream sent grpc-status {grpc_status[:20]!r}")
    status, name = STATUS.get(code, (500, "unknown"))
    message = unquote(grpc_message) or name.replace("_", " ")
    return Refusal(status, name, message, grpc_status=code)


# -- framing ----------------------------------------------------------------------------------


def frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(data: bytes) -> bytes:
    """The one message of a unary response; ``Refusal(502)`` for anything else."""
    if len(data) < 5:
        raise Refusal(502, "bad_upstream_frame", "the upstream sent a truncated gRPC frame")
    if data[0] != 0:
        raise Refusal(502, "bad_upstream_frame", "the upstream sent a compressed or unknown gRPC frame")
    length = int.from_bytes(data[1:5], "big")
    if length > MAX_MESSAGE:
        raise Refusal(502, "bad_upstream_frame", "the upstream sent a gRPC message larger than 4 MiB")
    if len(data) != 5 + length:
        problem = "a truncated gRPC message" if len(data) < 5 + length else "more than one gRPC message"
        raise Refusal(502, "bad_upstream_frame", f"the upstream sent {problem}")
    return data[5:]


# -- path templates -----------------------------------------------------------------------------


def _segments(text: str) -> str:
    out = []
    for segment in text.split("/"):
        if segment == "*":
            out.append("[^/]+")
        elif segment == "**":
            out.append(".*")
        elif not segment or "{" in segment or "}" in segment:
            raise ValueError(f"bad segment {segment!r}")
        else:
            out.append(re.escape(segment))
    return "/".join(out)


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """``/orders/{id}:cancel`` → (regex over the path, the field path of each variable)."""
    if not template.startswith("/"):
        raise ValueError("a path template starts with '/'")
    verb = ""
    colon = template.find(":", max(template.rfind("/"), template.rfind("}")))
    if colon != -1:
        template, verb = template[:colon], template[colon + 1 :]
    parts: list[str] = []
    fields: list[str] = []
    at = 1
    while at < len(template):
        if template[at] == "{":
            end = template.find("}", at)
            if end == -1:
                raise ValueError("unbalanced braces")
            name, _, pattern = template[at + 1 : end].partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                raise ValueError(f"bad variable {name!r}")
            parts.append(f"(?P<v{len(fields)}>{_segments(pattern) if pattern else '[^/]+'})")
            fields.append(name)
            at = end + 1
        else:
            end = template.find("/", at)
            end = len(template) if end == -1 else end
            parts.append(_segments(template[at:end]))
            at = end
        if at < len(template):
            if template[at] != "/":
                raise ValueError("a variable is a whole segment")
            at += 1
    regex = "/" + "/".join(parts) + (":" + re.escape(verb) if verb else "")
    return re.compile(regex + r"\Z"), tuple(fields)


# -- the service ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One REST route onto one RPC."""

    method: str
    template: str
    pattern: re.Pattern[str]
    variables: tuple[str, ...]
    rpc: str
    path: str  # the gRPC :path, /package.Service/Method
    request: Descriptor
    response: Descriptor
    body: str | None
    response_body: str | None = None


@dataclass
class Translator:
    """The REST routes of one gRPC service and the message classes they need."""

    service: str
    routes: tuple[Route, ...]
    pool: descriptor_pool.DescriptorPool
    max_body_bytes: int = 1024 * 1024
    _classes: dict[str, type[Message]] = field(default_factory=dict)

    def message(self, descriptor: Descriptor) -> Message:
        cls = self._classes.get(descriptor.full_name)
        if cls is None:
            cls = self._classes[descriptor.full_name] = message_factory.GetMessageClass(descriptor)
        return cls()

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method`` and ``path`` (no query) and its variables, or a 404/405."""
        allowed = []
        for route in self.routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            return route, {name: unquote(m.group(f"v{i}")) for i, name in enumerate(route.variables)}
        if allowed:
            raise Refusal(405, "method_not_allowed", f"{path} takes {', '.join(sorted(set(allowed)))}, not {method}")
        raise Refusal(404, "not_found", f"no method of {self.service} is at {method} {path}")

    def request(self, route: Route, variables: Mapping[str, str], query: Sequence[tuple[str, str]], body: Any) -> bytes:
        """The framed request message; ``Refusal(400)`` when the input does not fit it."""
        doc: dict[str, Any]
        if route.body == "*":
            if not isinstance(body, dict):
                raise Refusal(400, "invalid_body", f"the body of {route.rpc} is a JSON object")
            doc = body
        elif route.body is not None and body is not None:
            doc = {route.body: body}
        else:
            doc = {}
        bound = set(variables) | ({route.body} if route.body else set())
        grouped: dict[str, list[str]] = {}
        for key, value in query:
            grouped.setdefault(key, []).append(value)
        for key, values in grouped.items():
            if route.body == "*" or key.split(".")[0] in bound:
                raise Refusal(400, "invalid_query", f"query parameter {key!r} is not a field {route.rpc} takes there")
            _assign(doc, route.request, key, values, "query parameter")
        for name, value in variables.items():
            _assign(doc, route.request, name, [value], "path parameter")
        message = self.message(route.request)
        try:
            json_format.ParseDict(doc, message, descriptor_pool=self.pool, max_recursion_depth=64)
        except (json_format.ParseError, RecursionError, ValueError, TypeError) as exc:
            raise Refusal(400, "invalid_body", f"the request does not fit {route.request.name}: {exc}") from None
        return frame(message.SerializeToString())

    def response(self, route: Route, data: bytes) -> bytes:
        """The upstream's framed response → JSON bytes; ``Refusal(502)`` when it is not one."""
        message = self.message(route.response)
        try:
            message.ParseFromString(unframe(data))
        except DecodeError:
            raise Refusal(502, "bad_upstream_message", f"the upstream's reply is not a {route.response.name}") from None
        doc: Any = json_format.MessageToDict(
            message, always_print_fields_with_no_presence=True, descriptor_pool=self.pool
        )
        if route.response_body:
            doc = doc.get(route.response.fields_by_name[route.response_body].json_name)
        return json.dumps(doc, separators=(",", ":")).encode()


def _field(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    found = descriptor.fields_by_name.get(name)
    if found is None:
        found = next((f for f in descriptor.fields if f.json_name == name), None)
    return found


_INTEGER = (
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
)


def _scalar(f: FieldDescriptor, text: str, what: str, path: str) -> Any:
    """A path or query value as the JSON value proto3 JSON parsing takes for ``f``."""
    if f.type == FieldDescriptor.TYPE_BOOL:
        if text not in ("true", "false", "1", "0"):
            raise Refusal(400, "invalid_argument", f"{what} {path!r} is true or false, not {text[:40]!r}")
        return text in ("true", "1")
    if f.type in _INTEGER and not re.fullmatch(r"-?[0-9]{1,20}", text):
        raise Refusal(400, "invalid_argument", f"{what} {path!r} is an integer, not {text[:40]!r}")
    return text  # numbers, enums (names or numbers), bytes (base64) and well-known types parse from strings


def _assign(doc: dict[str, Any], descriptor: Descriptor, path: str, values: list[str], what: str) -> None:
    """Set the field at dotted ``path`` of ``doc`` (a proto3-JSON dict for ``descriptor``)."""
    parts = path.split(".")
    node, desc = doc, descriptor
    for i, part in enumerate(parts):
        f = _field(desc, part)
        if f is None:
            raise Refusal(400, "invalid_argument", f"{what} {path!r}: {desc.name} has no field {part!r}")
        if i < len(parts) - 1:
            if f.message_type is None or f.is_repeated:
                raise Refusal(400, "invalid_argument", f"{what} {path!r}: {part} is not a message field")
            child = node.get(f.json_name, node.get(f.name))
            node.pop(f.name, None)
            if not isinstance(child, dict):
                child = {}
            node[f.json_name] = child
            node, desc = child, f.message_type
            continue
        node.pop(f.name, None)
        node.pop(f.json_name, None)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            raise Refusal(400, "invalid_argument", f"{what} {path!r}: a map cannot come from a {what}")
        if f.is_repeated:
            node[f.json_name] = [_scalar(f, v, what, path) for v in values]
        elif len(values) > 1:
            raise Refusal(400, "invalid_argument", f"{what} {path!r} is given {len(values)} times")
        else:
            node[f.json_name] = _scalar(f, values[0], what, path)


# -- loading --------------------------------------------------------------------------------------


def _files(spec: GrpcTranslation, base: Path) -> descriptor_pb2.FileDescriptorSet:
    try:
        return protoc.service_set(spec.descriptor, spec.protos, spec.proto_path, base)
    except protoc.ProtoError as exc:
        raise GrpcConfigError(("descriptor",) if spec.descriptor is not None else ("protos",), str(exc)) from None


def _pool(files: descriptor_pb2.FileDescriptorSet) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        try:
            pool.Add(proto)
        except TypeError as exc:
            raise GrpcConfigError(("descriptor",), f"cannot load {proto.name}: {exc}") from None
    return pool


def _rules(method: descriptor_pb2.MethodDescriptorProto) -> Iterable[tuple[str, str, str, str]]:
    """(HTTP method, template, body, response_body) of a method's google.api.http annotation."""
    if not method.options.HasExtension(annotations_pb2.http):
        return
    top = method.options.Extensions[annotations_pb2.http]
    for rule in (top, *top.additional_bindings):
        kind = rule.WhichOneof("pattern")
        if kind in _HTTP_KINDS:
            yield kind.upper(), getattr(rule, kind), rule.body, rule.response_body
        elif kind == "custom":
            yield rule.custom.kind.upper(), rule.custom.path, rule.body, rule.response_body


def _check_fields(descriptor: Descriptor, path: str) -> str | None:
    desc = descriptor
    parts = path.split(".")
    for i, part in enumerate(parts):
        f = _field(desc, part)
        if f is None:
            return f"{desc.full_name} has no field {part!r}"
        if i < len(parts) - 1:
            if f.message_type is None or f.is_repeated:
                return f"{part} in {path} is not a message field"
            desc = f.message_type
        elif f.is_repeated or (
            f.message_type is not None and not f.message_type.full_name.startswith("google.protobuf.")
        ):
            return f"{path} is not a single scalar field"
    return None


def _route(
    service: Any, rpc: str, method: str, template: str, body: str | None, *, response_body: str | None = None
) -> Route:
    """A checked route; ``ValueError(problem, key)`` names the offending key."""
    found = service.methods_by_name.get(rpc)
    if found is None:
        known = ", ".join(sorted(service.methods_by_name)) or "none"
        raise ValueError(f"{service.full_name} has no method {rpc!r} (known: {known})", "rpc")
    if found.client_streaming or found.server_streaming:
        raise ValueError(f"{rpc} is a streaming method: only unary methods are translated", "rpc")
    try:
        pattern, variables = compile_template(template)
    except (ValueError, re.error) as exc:
        raise ValueError(f"not a path template: {template!r} ({exc})", "path") from None
    for variable in variables:
        problem = _check_fields(found.input_type, variable)
        if problem:
            raise ValueError(f"{{{variable}}}: {problem}", "path")
    if body and body != "*":
        f = _field(found.input_type, body)
        if f is None:
            raise ValueError(f"{found.input_type.full_name} has no field {body!r}", "body")
    if response_body and response_body not in found.output_type.fields_by_name:
        raise ValueError(f"{found.output_type.full_name} has no field {response_body!r}", "response_body")
    return Route(
        method,
        template,
        pattern,
        variables,
        rpc,
        f"/{service.full_name}/{rpc}",
        found.input_type,
        found.output_type,
        body or None,
        response_body or None,
    )


def build(
    files: descriptor_pb2.FileDescriptorSet,
    service_name: str,
    routes: Sequence[GrpcRoute] = (),
    max_body_bytes: int = 1024 * 1024,
) -> Translator:
    """The translator of ``service_name``: configured ``routes`` first, then its annotations."""
    pool = _pool(files)
    try:
        service = pool.FindServiceByName(service_name)
    except KeyError:
        known = sorted(f"{p.package}.{s.name}" if p.package else s.name for p in files.file for s in p.service)
        raise GrpcConfigError(
            ("service",), f"no service {service_name} in the descriptors (known: {', '.join(known) or 'none'})"
        ) from None
    out: list[Route] = []
    seen: dict[tuple[str, str], str] = {}
    for j, spec in enumerate(routes):
        try:
            route = _route(service, spec.rpc, spec.method, spec.path, spec.body)
        except ValueError as exc:
            raise GrpcConfigError(("routes", j, exc.args[1]), exc.args[0]) from None
        if (spec.method, spec.path) in seen:
            raise GrpcConfigError(("routes", j, "path"), f"{spec.method} {spec.path} is already routed")
        seen[(spec.method, spec.path)] = spec.rpc
        out.append(route)
    proto = next(p for p in files.file if p.name == service.file.name)
    service_proto = next(s for s in proto.service if s.name == service.name)
    for method in service_proto.method:
        for http_method, template, body, response_body in _rules(method):
            if (http_method, template) in seen:
                continue  # the configured route wins
            try:
                out.append(_route(service, method.name, http_method, template, body, response_body=response_body))
            except ValueError as exc:
                raise GrpcConfigError(("service",), f"{method.name}'s google.api.http: {exc.args[0]}") from None
            seen[(http_method, template)] = method.name
    if not out:
        raise GrpcConfigError(
            ("routes",), f"no routes: {service_name} has no google.api.http annotations, so list its routes here"
        )
    return Translator(service_name, tuple(out), pool, max_body_bytes)


def problems(gateway: Gateway) -> Iterator[tuple[config.KeyPath, str]]:
    """gRPC routes that their descriptors do not describe, as (key path, problem) pairs.

    Each translation's descriptors are loaded as serving them would, from paths relative to the
    gateway.yaml they came from. extproc runs this at start and on reload, ``sidegate check`` too:
    the config model cannot, as it never imports a sidecar.
    """
    base = gateway.base
    for i, api in enumerate(gateway.apis):
        spec = api.translate.grpc if api.translate is not None else None
        if spec is None:
            continue
        try:
            load(spec, base)
        except GrpcConfigError as exc:
            yield ("apis", i, "translate", "grpc", *exc.where), exc.problem


def load(spec: GrpcTranslation, base: Path, max_body_bytes: int = 1024 * 1024) -> Translator:
    """The translator a gateway.yaml ``grpc:`` section describes (paths relative to ``base``)."""
    return build(_files(spec, base), spec.service, spec.routes, max_body_bytes)
