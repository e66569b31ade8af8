"""The style the team agreed on (STYLE.md) is checked like everything else: ruff, ruff format, and
mypy --strict over the packages, with the versions pinned in pyproject's test extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_meets_the_style(argv: list[str]) -> None:
    result = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_lock_agrees_with_pyproject_and_the_image_requirements() -> None:
    """uv.lock must satisfy pyproject.toml, and requirements/image.txt (what the Dockerfile installs)
    must be exactly the lock's export: an edit to one without `make lock` fails here."""
    result = subprocess.run(["make", "-s", "check-lock"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
