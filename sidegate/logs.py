"""Structured JSON logs, one object per line, with secrets redacted.

Fields passed as ``extra={"fields": {...}}`` are merged into the line; any key named like a
secret header (``authorization``, ``cookie``, ``x-api-key``, …) is replaced by ``[redacted]``
at any depth, so a header map can be logged as it is.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_KEYS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api_key", "token", "pepper"}
)
REDACTED = "[redacted]"
_secret_keys: frozenset[str] = SECRET_KEYS


def redact(value: Any) -> Any:
    """A copy of ``value`` with every secret-named key's value replaced."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and k.lower() in _secret_keys else redact(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line.update(redact(fields))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def setup(service: str, level: str = "info", extra_secrets: Iterable[str] = ()) -> None:
    """Send every logger to stderr as JSON lines; ``extra_secrets`` adds header names to redact."""
    global _secret_keys  # noqa: PLW0603 - set once, at process start
    _secret_keys = SECRET_KEYS | {name.lower() for name in extra_secrets}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fields(**values: Any) -> dict[str, Any]:
    """``log.info("msg", extra=fields(port=1))``."""
    return {"fields": values}
