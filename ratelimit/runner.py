"""The limiter's wiring: built from a config at start, kept up to date on reload, closed at the end.

The ratelimit sidecar serves from it, and authz uses the same one when it limits in-process
(``ratelimit.in_authz``); neither touches the other's servicer. Limits come from gateway.yaml
(``plans``, each API's ``limits``, the ``ratelimit`` section) and the reference-format files it
names. ``check`` reads them all and raises a ``ConfigError`` naming FILE:LINE; the kernel calls
it for every sidecar before ``reload`` puts anything in force, so a bad file changes nothing.

Changes to the numbers, windows, algorithms and methods of limits take effect at once, and
leases and cached refusals of the limits that did not change are kept. A new *kind* of count
on a route (say a first ``by: ip`` limit on an API) also needs Envoy's config recompiled,
because Envoy decides which descriptors it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ratelimit import limits as limits_module
from ratelimit import reference
from ratelimit import settings as reference_settings
from ratelimit.limiter import Limiter, lease_size
from ratelimit.limits import Limits
from ratelimit.store import MemoryStore, RedisStore, Store
from sidegate import logs
from sidegate.config import Gateway
from sidegate.settings import Settings

log = logging.getLogger("ratelimit")
STATS_INTERVAL = 60.0  # seconds between stats lines in the log


def read_limits(gateway: Gateway, folder: Sequence[Path] = ()) -> Limits:
    """Every limit of ``gateway``, of the reference configs it names and of the reference config
    files ``folder`` lists (``sidegate ratelimit --reference-config DIR``); raises ``ConfigError``."""
    rl = gateway.ratelimit
    paths = [*(gateway.base / name for name in rl.reference_configs), *folder]
    domains = reference.load(paths, on_store_error=rl.on_store_error, shadow=rl.shadow_mode)
    return limits_module.from_gateway(gateway, domains)


def open_store(settings: Settings, gateway: Gateway) -> Store:
    """Redis when a URL is configured (shared by every replica), else memory (this process)."""
    if settings.redis_url:
        return RedisStore(settings.redis_url, timeout=gateway.ratelimit.redis_timeout)
    return MemoryStore()


class LimiterRunner:
    """One limiter for one sidecar server process, and the tasks that go with it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # A folder of envoyproxy/ratelimit configs, read with the reference's environment.
        self.folder = settings.reference_config
        self.env = reference_settings.reference_env(os.environ) if self.folder is not None else None
        self._read: tuple[Gateway, Limits] | None = None  # what ``check`` read, for ``reload``
        self._limiter: Limiter | None = None
        self._stats: asyncio.Task[None] | None = None

    @property
    def limiter(self) -> Limiter:
        assert self._limiter is not None, "start() first"
        return self._limiter

    def local_processes(self, gateway: Gateway) -> int:
        """How many processes each keep a local bucket when Redis fails (``on_store_error:
        local``): every worker of every replica. Each admits limit / that many, so all of them
        together never admit more than the limit."""
        return gateway.ratelimit.expected_replicas * max(1, self.settings.workers)

    def files(self) -> list[Path]:
        """The reference folder, its subfolders and its config files: the kernel watches them."""
        if self.folder is None:
            return []
        listed = reference.folder_files(self.folder, ignore_dotfiles=self.env is not None and self.env.ignore_dotfiles)
        folders = sorted({path.parent for path in listed})
        return [self.folder, *folders, *listed]

    def check(self, gateway: Gateway) -> Limits:
        """The limits of ``gateway``, read now; raises ``ConfigError`` and changes nothing."""
        if self._read is None or self._read[0] is not gateway:
            listed = [path for path in self.files() if path.is_file()]
            self._read = (gateway, read_limits(gateway, listed))
        return self._read[1]

    async def start(self, gateway: Gateway) -> Limiter:
        limits = self.check(gateway)
        rl = gateway.ratelimit
        store = open_store(self.settings, gateway)
        lease = lease_size(store, rl.lease)
        limiter = Limiter(
            limits,
            store,
            time.time,
            headers=rl.headers,
            expected_replicas=self.local_processes(gateway),
            lease=lease,
            over_limit_cache=self.env is None or self.env.over_limit_cache,  # the reference: LOCAL_CACHE_SIZE_IN_BYTES
            reference=reference_settings.options(os.environ),
        )
        if isinstance(store, RedisStore):
            await store.warm()  # connect and load the script now, not on the first request
        self._limiter = limiter
        self._stats = asyncio.create_task(report_every(limiter, STATS_INTERVAL), name="ratelimit-stats")
        return limiter

    def reload(self, gateway: Gateway) -> None:
        """Put the limits of ``gateway`` in force (``check`` has read them)."""
        limits = self.check(gateway)
        limiter = self.limiter
        rl = gateway.ratelimit
        lease = lease_size(limiter.store, rl.lease)
        limiter.reload(limits, headers=rl.headers, expected_replicas=self.local_processes(gateway), lease=lease)
        if isinstance(limiter.store, RedisStore):
            limiter.store.timeout = rl.redis_timeout
        log.info(
            "limits reloaded",
            extra=logs.fields(rules=sum(1 for _ in limits.rules()), domains=sorted(limits.domains)),
        )

    async def close(self) -> None:
        if self._stats is not None:
            self._stats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats
        if self._limiter is not None:
            await self._limiter.store.close()


async def report_every(limiter: Limiter, interval: float) -> None:
    """Log what changed in the stats each ``interval`` (and whether the store is degraded)."""
    last: Counter[str] = Counter()
    while True:
        await asyncio.sleep(interval)
        current = limiter.stats.copy()
        delta, last = current - last, current
        if delta or limiter.degraded:
            rules = {k.removeprefix("rule."): v for k, v in delta.items() if k.startswith("rule.")}
            totals = {k.replace(".", "_"): v for k, v in delta.items() if not k.startswith("rule.")}
            log.info(
                "rate-limit stats",
                extra=logs.fields(interval_s=interval, degraded=limiter.degraded, **totals, rules=rules),
            )
