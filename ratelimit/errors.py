"""Errors of the ratelimit sidecar.

    RateLimitError
    ├── StoreUnavailable   the counter store did not answer in time, refused, or its circuit
    │                      breaker is open; the rule's ``on_store_error`` policy decides instead
    └── BadRequest         a RateLimitRequest no Envoy sends (no domain, no descriptors, an
                           entry without a key): answered INVALID_ARGUMENT, never a stack trace

A bad limits file is a ``sidegate.errors.ConfigError`` (``FILE:LINE: key.path: problem``), as
for gateway.yaml. Redis exceptions are translated into ``StoreUnavailable`` in ``store.py`` and
nowhere else.
"""

from __future__ import annotations


class RateLimitError(Exception):
    """Base of every error the ratelimit sidecar raises on purpose."""

    code = "ratelimit_error"


class StoreUnavailable(RateLimitError):  # noqa: N818 - reads as a state, like authz's
    code = "store_unavailable"


class BadRequest(RateLimitError):  # noqa: N818 - named for its wire meaning
    code = "bad_request"
