"""One ext_proc stream = one HTTP request/response exchange, one ``Session``.

The session takes one phase at a time and returns one ``ProcessingResponse``. Walking skeleton:
every phase passes through unchanged. Transforms and translation arrive with their issues.
"""

from __future__ import annotations

from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

# phase name (the ProcessingRequest oneof) → the ProcessingResponse that continues unchanged
_CONTINUE = {
    "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
    "response_headers": pb.ProcessingResponse(response_headers=pb.HeadersResponse()),
    "request_body": pb.ProcessingResponse(request_body=pb.BodyResponse()),
    "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
    "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
    "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
}


class Session:
    def handle(self, phase: str, message: Any) -> Any:
        """The response to one phase of the exchange."""
        return _CONTINUE[phase]
