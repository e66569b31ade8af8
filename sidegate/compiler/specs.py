"""What a route is, before it is Envoy YAML: the specs that ``routes.emit`` turns into routes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reach:
    """Which paths a route can match, for grouping the table (``groups``): every one starts with
    ``literal``; with ``segment`` set, a path is ``/<segment><rest>`` or ``/<segment><rest>/…``
    (``segment`` a regex for one path segment: a version named in the path)."""

    literal: str
    segment: str | None = None
    rest: str = ""


@dataclass(frozen=True)
class Target:
    """A route to an upstream service."""

    name: str
    match: dict[str, Any]
    service: str
    rewrite: str | None = None  # the path prefix the upstream sees instead of the client's
    authz_context: Mapping[str, str] | None = None  # context_extensions authz reads
    extproc_route: str | None = None  # ext_proc on for this route, named so (contract.route_key)
    version: str | None = None  # the API version the client speaks, told to the upstream
    response_headers: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class Answer:
    """A route Envoy answers itself with a JSON body, no callout and no upstream."""

    name: str
    match: dict[str, Any]
    status: int
    body: str
    reach: Reach | None = None  # where ``match`` is a regex: the paths it can match


RouteSpec = Target | Answer
