"""Value types of gateway.yaml: durations, names, HTTP methods, host:port, and the literal
choices that the sidecars share with the model (rate-limit algorithms, header styles)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    model_validator,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)):(?P<port>[0-9]{1,5})$"
)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"5s"``, ``"2m"``, ``"24h"``, ``"90d"`` → seconds."""
    if isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 2m, 24h, 90d)")


def _positive(value: float) -> float:
    if value < 0.001:
        raise ValueError("must be at least 1ms")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), AfterValidator(_positive)]


def _name(value: str) -> str:
    if not re.match(_NAME, value):
        raise ValueError(f"{value!r}: names are lowercase letters, digits, '-' and '_', starting with a letter")
    return value


def _method(value: str) -> str:
    if value not in HTTP_METHODS:
        raise ValueError(f"unknown HTTP method {value!r} (known: {', '.join(HTTP_METHODS)})")
    return value


def _not_null(value: object) -> object:
    if value is None:
        raise ValueError("empty: write {} for the defaults (leave the key out to turn it off)")
    return value


Name = Annotated[str, AfterValidator(_name)]
Method = Annotated[str, AfterValidator(_method)]


class Model(BaseModel):
    """The base of every gateway.yaml model: unknown keys are errors, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class HostPort(BaseModel):
    """``host:port``; IPv6 literals in brackets (``[::1]:9001``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        m = _HOST_PORT.match(value) if isinstance(value, str) else None
        if m is None or not 0 < int(m.group("port")) < 65536:
            raise ValueError(f"not host:port: {value!r} (e.g. 127.0.0.1:9001, [::1]:9001, echo:8080)")
        host = m.group("v6") or m.group("host")
        if m.group("v6"):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"not an IPv6 address: {host!r}") from None
        return {"host": host, "port": int(m.group("port"))}

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


class UnixSocket(BaseModel):
    """``unix:PATH``: a sidecar server on Unix sockets, one per worker (``<stem>-<n>.sock``).

    A relative path is relative to the state folder (``unix:sidecars.sock`` under ``sidegate up``
    is ``.sidegate/sidecars.sock``), so one gateway.yaml works wherever the stack keeps its state.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, str) or not value.startswith("unix:"):
            raise ValueError(f"not unix:PATH: {value!r}")
        path = value.removeprefix("unix:")
        if not path or "\0" in path or path.endswith("/"):
            raise ValueError(f"not a socket path: {value!r} (e.g. unix:/run/sidegate/sidecars.sock)")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"socket path longer than {UNIX_PATH_MAX} bytes: {path!r}")
        return {"path": path}

    def __str__(self) -> str:
        return f"unix:{self.path}"

    def resolve(self, state_dir: str | Path) -> str:
        """The path itself when absolute, else under ``state_dir``."""
        return self.path if self.path.startswith("/") else str(Path(state_dir) / self.path)


# A Unix socket path holds at most 107 bytes; "-<n>" goes in, and a relative path gets the
# state folder in front: leave room for both.
UNIX_PATH_MAX = 80


def sidecar_address(value: object) -> object:
    """``unix:PATH`` or ``host:port``, for the models' union of the two."""
    return UnixSocket.model_validate(value) if isinstance(value, str) and value.startswith("unix:") else value


# Choices that the sidecars read back from the model: one spelling each, shared as types.
LimitAlgorithm = Literal["fixed_window", "sliding_window", "gcra"]  # how a rate limit counts
HeaderStyle = Literal["ietf", "x-ratelimit", "off"]  # which rate-limit headers clients get
StoreErrorPolicy = Literal["allow", "deny", "local"]  # what a rate limit does when Redis fails
