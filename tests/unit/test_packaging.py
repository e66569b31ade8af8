"""What a regular (non-editable) install ships: every package of the tree, listed in pyproject.

The development venv installs the tree in editable mode, where a package missing from the list
still imports; the image's regular install would leave it out, and its processes would fail at
start (tests/e2e/test_compose.py would see it, minutes later)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("sidegate", "authz", "ratelimit", "extproc")


def test_every_package_in_the_tree_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for top in TOP for init in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "packages the install would leave out: add them to [tool.setuptools]"
    assert listed - found == set(), "listed packages that do not exist"
