"""``sidegate ratelimit`` and ``python -m ratelimit``: the rate-limit service on its own.

    sidegate ratelimit --reference-config DIR   a folder of envoyproxy/ratelimit configs, no gateway.yaml
    sidegate ratelimit                          the same, the folder from RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/
                                                RUNTIME_APPDIRECTORY as the reference finds it
    sidegate ratelimit --config gateway.yaml    gateway.yaml's limits (as ``sidegate serve --sidecars ratelimit``)

With a folder, the reference's environment is read as the reference reads it
(``ratelimit/settings.py``): Redis from ``REDIS_URL``, the port from ``GRPC_PORT`` (8081), and
what we do not provide is refused by name in one line. Flags win over the environment. Counters
in memory (no Redis) are one set per process: one worker, and ``--workers`` above 1 is refused.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ratelimit import settings as reference_settings
from sidegate.errors import SettingsError
from sidegate.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reference-config",
        type=Path,
        help="a folder of envoyproxy/ratelimit config files (*.yaml), served with no gateway.yaml",
    )


def settings_for(args: argparse.Namespace, base: Settings, environ: Mapping[str, str]) -> Settings:
    """The settings to serve with: ``base`` (flags and SIDEGATE_* already applied), completed
    from the reference's environment when serving a folder; ``SettingsError`` for what we refuse."""
    if args.config is not None and args.reference_config is not None:
        raise SettingsError("give --config gateway.yaml or --reference-config DIR, not both")
    if args.config is not None or base.config is not None:
        return _checked(base, explicit_workers=args.workers is not None or "SIDEGATE_WORKERS" in environ)
    env = reference_settings.reference_env(environ)
    folder = args.reference_config or base.reference_config
    if folder is None:
        if "RUNTIME_ROOT" not in environ:
            raise SettingsError("nothing to serve: give --reference-config DIR (or RUNTIME_ROOT), or --config FILE")
        folder = env.folder
    if not folder.is_dir():
        raise SettingsError(f"--reference-config {folder}: not a folder")
    settings = replace(
        base,
        reference_config=folder,
        host=args.host or environ.get("SIDEGATE_HOST") or env.host or base.host,
        port=args.port if args.port is not None else _sidegate_port(environ, env.port),
        redis_url=base.redis_url or env.redis_url,
        log_level=args.log_level or environ.get("SIDEGATE_LOG_LEVEL") or env.log_level or base.log_level,
    )
    return _checked(settings, explicit_workers=args.workers is not None or "SIDEGATE_WORKERS" in environ)


def _sidegate_port(environ: Mapping[str, str], default: int) -> int:
    raw = environ.get("SIDEGATE_PORT")
    return int(raw) if raw else default  # SIDEGATE_PORT was validated by Settings.from_env


def _checked(settings: Settings, *, explicit_workers: bool) -> Settings:
    """Memory counters: one worker unless more were asked for, and then a refusal."""
    if settings.redis_url:
        return settings
    if not explicit_workers:
        return replace(settings, workers=1)
    problem = reference_settings.memory_workers_problem(settings.workers, settings.redis_url)
    if problem is not None:
        raise SettingsError(problem)
    return settings


def environment() -> dict[str, str]:
    return dict(os.environ)
