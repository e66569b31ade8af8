"""Sidegate: stock Envoy plus three Python gRPC sidecars (authz, ratelimit, extproc)."""

__version__ = "0.1.0"
