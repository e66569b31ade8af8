"""Hot reload of limits: the files they come from, watched, and reloaded all or nothing.

Limits come from gateway.yaml (``plans``, each API's ``limits``, the ``ratelimit`` section) and
the reference-format files it names. ``LimitsFiles.reload`` reads them all again; when any of
them is bad the limits in force stay, and the error is logged with its ``FILE:LINE``. It runs
when a file changes (polled: a stat per file per second) or on SIGHUP.

Changes to the numbers, windows, algorithms and methods of limits that exist take effect at
once. A new *kind* of count on a route (say a first ``by: ip`` limit on an API) also needs
Envoy's config recompiled, because Envoy decides which descriptors it sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from ratelimit import limits as limits_module
from ratelimit import reference
from ratelimit.limiter import Limiter, lease_size
from ratelimit.limits import Limits
from sidegate import config, logs
from sidegate.config import Gateway
from sidegate.errors import ConfigError

log = logging.getLogger("ratelimit.reload")
POLL_INTERVAL = 1.0
_Stamp = tuple[int, int, int] | None


class LimitsFiles:
    """gateway.yaml (when there is a file) and the reference configs it names."""

    def __init__(
        self, config_path: Path | None, gateway: Gateway, folder: Path | None = None, ignore_dotfiles: bool = False
    ) -> None:
        self.config_path = config_path
        self.gateway = gateway
        self._stamps: dict[Path, _Stamp] = {}
        # A folder of reference configs (`sidegate ratelimit --reference-config DIR`): its listing
        # is part of what is watched, so a new file, a removed one or a symlink swap reloads.
        self.folder = folder
        self.ignore_dotfiles = ignore_dotfiles
        self._listed: list[Path] = []

    def folder_files(self) -> list[Path]:
        if self.folder is None:
            return []
        return reference.folder_files(self.folder, ignore_dotfiles=self.ignore_dotfiles)

    def reference_paths(self, gateway: Gateway) -> list[Path]:
        """Reference configs, relative ones read from gateway.yaml's folder."""
        base = self.config_path.parent if self.config_path is not None else Path()
        return [base / name for name in gateway.ratelimit.reference_configs]

    def load(self) -> tuple[Gateway, Limits]:
        """Read every file now; raises ``ConfigError`` and changes nothing when one is bad."""
        watched = [self.config_path] if self.config_path is not None else []
        stamps = {path: _stamp(path) for path in watched}
        gateway = config.load(self.config_path) if self.config_path is not None else self.gateway
        listed = self.folder_files()
        paths = self.reference_paths(gateway) + listed
        stamps.update({path: _stamp(path) for path in paths})
        rl = gateway.ratelimit
        domains = reference.load(paths, on_store_error=rl.on_store_error, shadow=rl.shadow_mode)
        limits = limits_module.from_gateway(gateway, domains)
        self.gateway = gateway
        self._stamps = stamps
        self._listed = listed
        return gateway, limits

    def changed(self) -> bool:
        if self.folder is not None and self.folder_files() != self._listed:
            return True
        return any(_stamp(path) != stamp for path, stamp in self._stamps.items())

    def reload(self, limiter: Limiter, why: str) -> bool:
        """Put freshly read limits in force; on a bad file keep the old ones and log why."""
        try:
            gateway, limits = self.load()
        except ConfigError as exc:
            # Remember what was seen, so one bad save is logged once, not every second.
            self._listed = self.folder_files()
            self._stamps = {path: _stamp(path) for path in {*self._stamps, *self._listed}}
            log.error(
                "limits not reloaded: the limits in force stay",
                extra=logs.fields(trigger=why, error=str(exc), errors=list(exc.errors)),
            )
            return False
        rl = gateway.ratelimit
        lease = lease_size(limiter.store, rl.lease)
        limiter.reload(limits, headers=rl.headers, expected_replicas=rl.expected_replicas, lease=lease)
        timeout = getattr(limiter.store, "timeout", None)
        if timeout is not None:
            limiter.store.timeout = rl.redis_timeout  # type: ignore[attr-defined]
        log.info(
            "limits reloaded",
            extra=logs.fields(trigger=why, rules=sum(1 for _ in limits.rules()), domains=sorted(limits.domains)),
        )
        return True

    async def watch(self, limiter: Limiter, interval: float = POLL_INTERVAL) -> None:
        """Reload whenever a watched file changes, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                self.reload(limiter, "file changed")


def _stamp(path: Path) -> _Stamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)
