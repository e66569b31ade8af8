"""One ext_proc stream = one HTTP exchange = one session: a phase in, a ``ProcessingResponse`` out.

Envoy sends headers only (the route's override). ``Session`` drives a body ``Strategy``
(version transforms, XML ⇄ JSON: extproc/translators.py) and asks for a body —
``mode_override`` to BUFFERED — only when the strategy takes it: a request body whose
``content-length`` is known and within the route's limit (411 without one, 413 over it), a
response body of a media type it translates. So a GET never buffers, and Envoy never has to
hold a body it would cut off. ``GrpcSession`` turns a REST call into a unary gRPC call and
back (extproc/grpc_translate.py). Anything a client sent that cannot be translated is a 4xx
with a JSON error; an upstream that breaks its protocol a 502; never a 500 from here. A
replaced body carries its new ``content-length`` in the same reply, as Envoy requires, and
a response's old ``content-length`` is dropped first (Envoy otherwise answers 500: a
mismatch between content length and the length of the mutated body).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc import grpc_translate
from extproc.errors import Refusal
from extproc.grpc_translate import Translator
from extproc.translators import JSON, Strategy, is_json, load_json, media_type
from sidegate import logs, telemetry

log = logging.getLogger("extproc")
_MODE = processing_mode_pb2.ProcessingMode

# phase name (the ProcessingRequest oneof) → the ProcessingResponse that continues unchanged
_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def _header_map(headers: Any) -> dict[str, str]:
    return {h.key.lower(): h.raw_value.decode("latin-1") if h.raw_value else h.value for h in headers.headers}


def _headers(message: Any) -> dict[str, str]:
    return _header_map(message.headers)


def _trailers(message: Any) -> dict[str, str]:
    return _header_map(message.trailers)


def _set(headers: Iterable[tuple[str, str]], remove: Iterable[str] = ()) -> Any:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in headers
        ],
        remove_headers=list(remove),
    )


def immediate(refusal: Refusal) -> Any:
    """Answer the client now, with the refusal's JSON error body."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=refusal.status),
            headers=_set([("content-type", JSON)]),
            body=refusal.body(),
            details=f"sidegate_{refusal.code}",
        )
    )


def _replaced(phase: str, body: bytes, headers: Iterable[tuple[str, str]] = (), remove: Iterable[str] = ()) -> Any:
    common = pb.CommonResponse(
        header_mutation=_set([*headers, ("content-length", str(len(body)))], remove),
        body_mutation=pb.BodyMutation(body=body),
    )
    return pb.ProcessingResponse(**{phase: pb.BodyResponse(response=common)})


def _length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None


TOO_LARGE = "the upstream's answer is incomplete or larger than Envoy's buffer (1 MiB): too large to translate"
# Envoy checks a replaced response body against the content-length it already holds: drop it
# with the headers, set the new one with the body.
_DROP_LENGTH = pb.CommonResponse(header_mutation=pb.HeaderMutation(remove_headers=["content-length"]))


def _count(api: str, outcome: str) -> None:
    """Count one transform by API (a name from gateway.yaml) and outcome (ok or an error code)."""
    telemetry.count(telemetry.TRANSFORMS, api, outcome)


class Session:
    """Bodies through a route's ``Strategy``; with none, every phase continues unchanged."""

    def __init__(self, strategy: Strategy | None) -> None:
        self.strategy = strategy
        self.request_headers: dict[str, str] = {}
        self.partial = False  # an answer of unknown length: Envoy hands over what fits its buffer

    def handle(self, phase: str, message: Any) -> Any:
        """The response to one phase of the exchange."""
        if self.strategy is None:
            return _CONTINUE[phase]
        try:
            if phase == "request_headers":
                return self._request_headers(self.strategy, message)
            if phase == "request_body":
                body, media = self.strategy.request(message.body)
                _count(self.strategy.api, "ok")
                return _replaced(phase, body, [("content-type", media)] if media else [])
            if phase == "response_headers":
                return self._response_headers(self.strategy, message)
            if phase == "response_body":
                if self.partial and not message.end_of_stream:
                    raise Refusal(502, "upstream_body_too_large", TOO_LARGE)
                translated = self.strategy.response(message.body)
                if translated is None:
                    return _CONTINUE[phase]
                body, media = translated
                _count(self.strategy.api, "ok")
                return _replaced(phase, body, [("content-type", media)] if media else [])
        except Refusal as exc:
            _count(self.strategy.api, exc.code)
            if exc.status >= 500:
                log.warning(
                    "cannot translate a response", extra=logs.fields(api=self.strategy.api, problem=exc.message)
                )
            return immediate(exc)
        return _CONTINUE[phase]

    def _request_headers(self, strategy: Strategy, message: Any) -> Any:
        headers = self.request_headers = _headers(message)
        changes = strategy.request_headers(headers)
        proceed = pb.HeadersResponse(response=pb.CommonResponse(header_mutation=_set(changes))) if changes else None
        if message.end_of_stream or not strategy.takes_request(headers):
            return pb.ProcessingResponse(request_headers=proceed) if proceed else _CONTINUE["request_headers"]
        length = _length(headers)
        if length is None:
            return immediate(Refusal(411, "length_required", f"{strategy.noun} needs a content-length"))
        if length > strategy.max_body_bytes:
            limit = strategy.max_body_bytes
            return immediate(Refusal(413, "body_too_large", f"{strategy.noun} is limited to {limit} bytes"))
        if length == 0:
            return pb.ProcessingResponse(request_headers=proceed) if proceed else _CONTINUE["request_headers"]
        mode = _MODE(request_body_mode=_MODE.BUFFERED, response_header_mode=_MODE.SEND)
        return pb.ProcessingResponse(request_headers=proceed or pb.HeadersResponse(), mode_override=mode)

    def _response_headers(self, strategy: Strategy, message: Any) -> Any:
        headers = _headers(message)
        if message.end_of_stream or not strategy.takes_response(self.request_headers, headers):
            return _CONTINUE["response_headers"]
        length = _length(headers)
        if length == 0:
            return _CONTINUE["response_headers"]
        if length is not None and length > strategy.max_body_bytes:
            if not strategy.must_translate_response:
                return _CONTINUE["response_headers"]
            log.warning("response too large to translate", extra=logs.fields(api=strategy.api, length=length))
            return immediate(Refusal(502, "upstream_body_too_large", "the upstream's answer is too large to translate"))
        if length is None and not strategy.must_translate_response:
            return _CONTINUE["response_headers"]
        # Without a length, BUFFERED_PARTIAL: an answer larger than Envoy's buffer then reaches
        # us cut (and we say so, 502) instead of making Envoy answer a bare 500 itself.
        self.partial = length is None
        mode = _MODE(response_body_mode=_MODE.BUFFERED_PARTIAL if self.partial else _MODE.BUFFERED)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_DROP_LENGTH), mode_override=mode)


# The request headers a gRPC upstream needs; client headers that would confuse it go.
_GRPC_REMOVE = ("content-length", "accept-encoding", "content-encoding", "transfer-encoding", "expect")
# Response headers of the gRPC transport, not of the resource.
_GRPC_RESPONSE_REMOVE = ("grpc-accept-encoding", "grpc-encoding", "content-length", "grpc-status", "grpc-message")


class GrpcSession:
    """A REST/JSON call translated into one unary gRPC call, and its answer back into JSON."""

    def __init__(self, translator: Translator) -> None:
        self.translator = translator
        self.route: grpc_translate.Route | None = None
        self.variables: dict[str, str] = {}
        self.query: list[tuple[str, str]] = []
        self.answered = False  # a message came back and was translated

    def handle(self, phase: str, message: Any) -> Any:
        try:
            if phase == "request_headers":
                return self._request_headers(message)
            if phase == "request_body":
                return self._request_body(message)
            if phase == "response_headers":
                return self._response_headers(message)
            if phase == "response_body":
                return self._response_body(message)
            if phase == "response_trailers":
                return self._response_trailers(message)
        except Refusal as exc:
            _count(self.translator.service, exc.code)
            if exc.status == 502:
                log.warning("gRPC upstream broke the protocol", extra=logs.fields(problem=exc.message))
            return immediate(exc)
        return _CONTINUE[phase]

    def _call_headers(self, length: int) -> list[tuple[str, str]]:
        assert self.route is not None
        return [
            (":method", "POST"),
            (":path", self.route.path),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-accept-encoding", "identity"),
            ("content-length", str(length)),
        ]

    def _request_headers(self, message: Any) -> Any:
        headers = _headers(message)
        path, _, query = headers.get(":path", "/").partition("?")
        self.route, self.variables = self.translator.match(headers.get(":method", ""), path)
        self.query = parse_qsl(query, keep_blank_values=True)
        length = _length(headers)
        if self.route.body is None or message.end_of_stream or length == 0:
            # No body to read: the call is made now, its body added to a request that had none.
            call = self.translator.request(self.route, self.variables, self.query, None)
            common = pb.CommonResponse(
                status=pb.CommonResponse.CONTINUE_AND_REPLACE,
                header_mutation=_set(self._call_headers(len(call)), _GRPC_REMOVE),
                body_mutation=pb.BodyMutation(body=call),
            )
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        if not is_json(media_type(headers)):
            raise Refusal(415, "unsupported_media_type", f"{self.route.rpc} takes a JSON body (application/json)")
        if length is None:
            raise Refusal(411, "length_required", "a JSON body for a gRPC method needs a content-length")
        if length > self.translator.max_body_bytes:
            limit = self.translator.max_body_bytes
            raise Refusal(413, "body_too_large", f"a JSON body for this API is limited to {limit} bytes")
        mode = _MODE(request_body_mode=_MODE.BUFFERED, response_header_mode=_MODE.SEND)
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=mode)

    def _request_body(self, message: Any) -> Any:
        assert self.route is not None
        try:
            doc = load_json(message.body)
        except (ValueError, RecursionError) as exc:
            raise Refusal(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
        call = self.translator.request(self.route, self.variables, self.query, doc)
        # CONTINUE_AND_REPLACE: measured with Envoy 1.40, a plain CONTINUE keeps the client's
        # :method (PATCH, PUT) whatever the mutation says, and gRPC takes only POST.
        common = pb.CommonResponse(
            status=pb.CommonResponse.CONTINUE_AND_REPLACE,
            header_mutation=_set(self._call_headers(len(call)), _GRPC_REMOVE[1:]),
            body_mutation=pb.BodyMutation(body=call),
        )
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def _response_headers(self, message: Any) -> Any:
        headers = _headers(message)
        if "grpc-status" in headers:  # trailers-only: the status is all there is
            if headers["grpc-status"] == "0":
                raise Refusal(502, "bad_upstream_reply", "the upstream answered OK without a message")
            raise grpc_translate.status_error(headers["grpc-status"], headers.get("grpc-message", ""))
        if not media_type(headers).startswith("application/grpc"):
            status = headers.get(":status", "")
            if status in ("503", "504"):  # Envoy's own answer: no upstream, or too slow
                code = "upstream_unavailable" if status == "503" else "upstream_timeout"
                raise Refusal(int(status), code, "the gRPC upstream did not answer")
            raise Refusal(502, "bad_upstream_reply", f"the upstream answered HTTP {status} without gRPC")
        if message.end_of_stream:
            raise Refusal(502, "bad_upstream_reply", "the upstream answered without a message or a status")
        # BUFFERED_PARTIAL: a reply larger than Envoy's buffer reaches us cut, and is a 502 JSON
        # error (with BUFFERED, Envoy would answer a bare 500 itself). A whole reply comes whole.
        mode = _MODE(response_body_mode=_MODE.BUFFERED_PARTIAL, response_trailer_mode=_MODE.SEND)
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=_DROP_LENGTH), mode_override=mode)

    def _response_body(self, message: Any) -> Any:
        assert self.route is not None
        if not message.body and not message.end_of_stream:
            return _CONTINUE["response_body"]  # no message; the trailers tell why
        if message.end_of_stream:
            raise Refusal(502, "bad_upstream_reply", "the upstream's reply ended without a grpc-status")
        data = message.body
        if len(data) >= 5 and int.from_bytes(data[1:5], "big") > len(data) - 5:
            raise Refusal(502, "upstream_body_too_large", TOO_LARGE)  # cut at Envoy's buffer
        body = self.translator.response(self.route, data)
        self.answered = True
        return _replaced("response_body", body, [("content-type", JSON)], _GRPC_RESPONSE_REMOVE[:2])

    def _response_trailers(self, message: Any) -> Any:
        trailers = _trailers(message)
        status = trailers.get("grpc-status")
        if status is None:
            raise Refusal(502, "bad_upstream_reply", "the upstream's trailers hold no grpc-status")
        if status != "0":
            raise grpc_translate.status_error(status, trailers.get("grpc-message", ""))
        if not self.answered:
            raise Refusal(502, "bad_upstream_reply", "the upstream answered OK without a message")
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(remove_headers=["grpc-status", "grpc-message"]))
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse(header_mutation=common.header_mutation))
