"""The one file watcher: has any of these files changed since we last looked?

A sidecar server watches gateway.yaml and every file the config names (``Gateway.files``: the
reference rate-limit configs, gRPC descriptors and protos). ``sidegate up`` watches the same
set to recompile Envoy's config, and tells its sidecar servers to reload by SIGHUP instead of
letting them watch too. Both use this class. It polls: one ``stat`` per file per look, which
costs nothing next to a request and needs no inotify. A folder is watched as itself (an entry
added or removed changes it) and as every file in it. ``stat`` follows symbolic links, so a
symlink swapped to a new target, as the reference rate-limit service's runtime does, is seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

POLL_INTERVAL = 1.0  # seconds between looks
Stamp = tuple[int, int, int] | None  # (mtime, size, inode), or None when the file is missing


def stamp(path: Path) -> Stamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def expand(paths: Iterable[Path]) -> list[Path]:
    """Each path, and for a folder each file in it as well (hidden ones aside)."""
    out: list[Path] = []
    for path in paths:
        out.append(path)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir()))
    return out


class FileWatch:
    """The stamps of a set of files, taken by ``reset``; ``changed`` compares them with now."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self._stamps: dict[Path, Stamp] = {}
        self.reset(paths)

    def reset(self, paths: Iterable[Path]) -> None:
        """Watch ``paths`` from now on, as they are now."""
        self._stamps = {path: stamp(path) for path in expand(paths)}

    @property
    def paths(self) -> list[Path]:
        return list(self._stamps)

    def changed(self) -> bool:
        return any(stamp(path) != seen for path, seen in self._stamps.items()) or self._listing_changed()

    def _listing_changed(self) -> bool:
        # A file added to a watched folder: the folder's own stamp usually says so, but its mtime
        # may not move within one clock tick; comparing the listing is exact.
        folders = [path for path in self._stamps if path.is_dir()]
        return bool(folders) and set(expand(folders)) != {p for p in self._stamps if _under(p, folders)}


def _under(path: Path, folders: list[Path]) -> bool:
    return path in folders or path.parent in folders
