"""One ext_proc stream = one HTTP exchange = one ``Session``: a phase in, a ``ProcessingResponse`` out.

Envoy sends headers only (the route's override). The session asks for a body — ``mode_override``
to BUFFERED — only when it will transform it: a JSON body whose ``content-length`` is known and
within the route's limit. So a GET never buffers, and Envoy never has to hold a body it would
cut off. A body it cannot parse is a 400 with a JSON error (never a 500); a body without a
length is a 411, one over the limit a 413. A replaced body carries its new ``content-length`` in
the same reply, as Envoy requires.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from extproc.transforms import Chain, TransformError
from sidegate import logs

log = logging.getLogger("extproc")
_MODE = processing_mode_pb2.ProcessingMode
_JSON = "application/json"

# phase name (the ProcessingRequest oneof) → the ProcessingResponse that continues unchanged
_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


def _headers(message: Any) -> dict[str, str]:
    out = {}
    for header in message.headers.headers:
        out[header.key.lower()] = header.raw_value.decode("latin-1") if header.raw_value else header.value
    return out


def _is_json(headers: dict[str, str]) -> bool:
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    return media == _JSON or (media.startswith("application/") and media.endswith("+json"))


def _set(headers: Iterable[tuple[str, str]]) -> Any:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in headers
        ]
    )


def immediate(status: int, error: str, message: str) -> Any:
    body = (json.dumps({"error": error, "message": message}) + "\n").encode()
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=_set([("content-type", _JSON)]),
            body=body,
            details=f"sidegate_{error}",
        )
    )


def _replaced(phase: str, body: bytes) -> Any:
    common = pb.CommonResponse(
        header_mutation=_set([("content-length", str(len(body)))]),
        body_mutation=pb.BodyMutation(body=body),
    )
    return pb.ProcessingResponse(**{phase: pb.BodyResponse(response=common)})


class Session:
    def __init__(self, chain: Chain | None) -> None:
        self.chain = chain

    def handle(self, phase: str, message: Any) -> Any:
        """The response to one phase of the exchange."""
        if self.chain is None:
            return _CONTINUE[phase]
        if phase == "request_headers":
            return self._request_headers(message)
        if phase == "request_body":
            return self._body(phase, message, self.chain.up, request=True)
        if phase == "response_headers":
            return self._response_headers(message)
        if phase == "response_body":
            return self._body(phase, message, self.chain.down, request=False)
        return _CONTINUE[phase]

    def _length(self, headers: dict[str, str]) -> int | None:
        value = headers.get("content-length", "")
        return int(value) if value.isdigit() else None

    def _request_headers(self, message: Any) -> Any:
        assert self.chain is not None
        headers = _headers(message)
        if message.end_of_stream or not _is_json(headers):
            return _CONTINUE["request_headers"]  # nothing to transform: no body is buffered
        length = self._length(headers)
        if length is None:
            return immediate(411, "length_required", "a JSON body for this API version needs a content-length")
        if length > self.chain.max_body_bytes:
            limit = self.chain.max_body_bytes
            return immediate(413, "body_too_large", f"a JSON body for this API version is limited to {limit} bytes")
        if length == 0:
            return _CONTINUE["request_headers"]
        mode = _MODE(request_body_mode=_MODE.BUFFERED, response_header_mode=_MODE.SEND)
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(), mode_override=mode)

    def _response_headers(self, message: Any) -> Any:
        assert self.chain is not None
        headers = _headers(message)
        length = self._length(headers)
        if message.end_of_stream or not _is_json(headers) or not length or length > self.chain.max_body_bytes:
            return _CONTINUE["response_headers"]
        mode = _MODE(response_body_mode=_MODE.BUFFERED)
        # Envoy checks a replaced response body against the content-length it already holds:
        # drop it here, and set the new one with the body.
        drop = pb.CommonResponse(header_mutation=pb.HeaderMutation(remove_headers=["content-length"]))
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=drop), mode_override=mode)

    def _body(self, phase: str, message: Any, transform: Any, *, request: bool) -> Any:
        assert self.chain is not None
        try:
            doc = json.loads(message.body)
        except (ValueError, UnicodeDecodeError) as exc:
            if request:
                return immediate(400, "invalid_json", f"the request body is not valid JSON: {exc}")
            log.warning("upstream sent invalid JSON; passed through", extra=logs.fields(api=self.chain.api))
            return _CONTINUE[phase]
        try:
            out = transform(doc)
        except TransformError as exc:
            if request:
                return immediate(400, "invalid_body", f"the body does not fit version {self.chain.client}: {exc}")
            log.warning("cannot transform a response", extra=logs.fields(api=self.chain.api, problem=str(exc)))
            return immediate(502, "bad_upstream_body", "the upstream answered a body this version cannot carry")
        return _replaced(phase, json.dumps(out, separators=(",", ":")).encode())
