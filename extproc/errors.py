"""Errors of the extproc sidecar.

    ExtprocError
    ├── Refusal          what the client gets instead of a translation: an HTTP status, a stable
    │                    snake_case ``code`` (metrics, logs) and a message, as a JSON body. 4xx
    │                    for a client's body or call, 502 for an upstream that broke the rules.
    │                    A gRPC upstream's own error keeps its ``grpc_status`` in the body.
    ├── TransformError   a body without the shape a version's changes need (becomes a 400)
    └── GrpcConfigError  a gRPC translation its descriptors do not support; at start and on
                         reload it becomes a ``ConfigError`` naming FILE:LINE (``problems``)

The session answers every ``Refusal`` with an immediate response. Anything else raised while
serving is a bug: logged, and answered INTERNAL, which Envoy turns into its failure status.
"""

from __future__ import annotations

import json
from typing import Any


class ExtprocError(Exception):
    """Base of every error extproc raises on purpose."""


class Refusal(ExtprocError):  # noqa: N818 - named for what it does
    """An answer instead of a translation: HTTP status, error code, message."""

    def __init__(self, status: int, code: str, message: str, grpc_status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.grpc_status = grpc_status

    def body(self) -> bytes:
        """The JSON body the client gets."""
        doc: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.grpc_status is not None:
            doc["grpc_status"] = self.grpc_status
        return (json.dumps(doc) + "\n").encode()


class TransformError(ExtprocError, ValueError):
    """The body does not have the shape the declared changes need."""


class GrpcConfigError(ExtprocError):
    """A translation the descriptors do not support; ``where`` is the key path under ``grpc``."""

    def __init__(self, where: tuple[str | int, ...], problem: str) -> None:
        super().__init__(problem)
        self.where = where
        self.problem = problem
