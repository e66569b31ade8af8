"""Process settings: where to listen, how many workers, where state lives.

Settings come from the environment (``SIDEGATE_*``) once at start, and flags override them.
Policy lives in gateway.yaml, never here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sidegate.errors import SettingsError

ENV = {
    "config": "SIDEGATE_CONFIG",
    "host": "SIDEGATE_HOST",
    "port": "SIDEGATE_PORT",
    "workers": "SIDEGATE_WORKERS",
    "log_level": "SIDEGATE_LOG_LEVEL",
    "grace": "SIDEGATE_GRACE",
    "drain": "SIDEGATE_DRAIN",
    "state_dir": "SIDEGATE_STATE_DIR",
    "redis_url": "SIDEGATE_REDIS_URL",
}


@dataclass(frozen=True)
class Settings:
    config: Path | None = None
    host: str = "127.0.0.1"
    port: int = 9001
    workers: int = max(1, os.cpu_count() or 1)
    log_level: str = "info"
    grace: float = 10.0  # seconds in-flight calls get to finish after SIGTERM
    drain: float = 0.0  # seconds to report NOT_SERVING before closing the port
    state_dir: Path = Path(".sidegate")
    redis_url: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``SIDEGATE_*`` variables, then the non-None ``overrides``."""
        environ = dict(os.environ) if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = environ.get(ENV[field.name])
            if raw not in (None, ""):
                values[field.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **{k: _coerce(k, v) for k, v in values.items()})


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "int":
            whole = int(value)
            if whole < (0 if name == "port" else 1):
                raise ValueError
            return whole
        if kind == "float":
            number = float(value)
            if number < 0:
                raise ValueError
            return number
        if "Path" in str(kind):
            return Path(value)
    except ValueError:
        flag = "--" + name.replace("_", "-")
        raise SettingsError(f"bad value for {ENV[name]} / {flag}: {value!r}") from None
    return value
