"""What a request must present (``Auth``) and how often it may come (``RateLimitRule``): the
policy types that an edge API and the mesh share. The mesh checks an end user's token on a
call between services with the same ``Auth``, and limits each calling service with the same
rules, counted by the same ratelimit sidecar."""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from sidegate.config.values import Duration, LimitAlgorithm, Method, Model, Name, StoreErrorPolicy, _method

_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token characters


def _scope(value: str) -> str:
    if not _SCOPE.match(value):
        raise ValueError(f"not a scope: {value!r} (printable ASCII, no spaces, quotes or backslashes)")
    return value


Scope = Annotated[str, AfterValidator(_scope)]


def _scopes_by_method(value: object) -> object:
    """``[a, b]`` means every method; a mapping names methods (``"*"`` for the others)."""
    if isinstance(value, list | tuple):
        return {"*": value}
    return value


def _method_or_star(value: str) -> str:
    return value if value == "*" else _method(value)


class Auth(Model):
    """What a request must present. Routes that are not anonymous go through authz.

    ``scopes`` is a list (every method) or a mapping from method (or ``"*"``) to the scopes a
    credential must hold, all of them.
    """

    anonymous: bool = False
    api_key: bool = False
    api_key_query: str | None = None  # a query parameter that may carry the key (off unless named)
    jwt: tuple[Name, ...] = ()  # issuers (the top-level ``issuers``) whose bearer tokens it accepts
    # Decide, log and count, but let every request through: to roll a new policy out on live traffic.
    shadow: bool = False
    scopes: Annotated[
        dict[Annotated[str, AfterValidator(_method_or_star)], tuple[Scope, ...]],
        BeforeValidator(_scopes_by_method),
        AfterValidator(MappingProxyType),
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Auth:
        if self.anonymous and (self.api_key or self.jwt or self.scopes or self.shadow):
            raise ValueError("anonymous: true takes no credentials, scopes or shadow mode")
        if self.api_key_query is not None and not self.api_key:
            raise ValueError("api_key_query needs api_key: true")
        return self

    def required_scopes(self, method: str) -> tuple[str, ...]:
        return self.scopes.get(method, self.scopes.get("*", ()))


class RateLimitRule(Model):
    """``requests`` per ``window`` (any duration: ``1s``, ``30s``, ``1d``), counted by an algorithm.

    ``fixed_window`` is clock-aligned (as Envoy's reference service), ``sliding_window`` weighs the
    previous window by how much of it still overlaps, ``gcra`` is a token bucket holding up to
    ``requests``. ``methods`` narrows the rule to some HTTP methods; ``shadow_mode`` counts and
    reports but never denies; ``on_store_error`` overrides ``ratelimit.on_store_error``.
    """

    name: Name | None = None  # the policy name clients see in RateLimit-Policy (default: derived)
    requests: int = Field(ge=0, le=1_000_000_000)
    window: Duration
    algorithm: LimitAlgorithm = "fixed_window"
    methods: tuple[Method, ...] = ()
    shadow_mode: bool = False
    on_store_error: StoreErrorPolicy | None = None
