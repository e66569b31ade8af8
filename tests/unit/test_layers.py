"""The seams between the parts, read from the imports: the sidecars and the config model never
reach into the compiler or the CLI, and the config model imports no sidecar. A new import across a
seam fails here, with the file and the line."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SIDECARS = ("authz", "ratelimit", "extproc")


@functools.cache
def _imports(path: Path) -> tuple[tuple[int, str], ...]:
    return tuple(_walk(path))


def _walk(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def _modules(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py") if "_pb2" not in path.name)


def _crossings(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: {name}"
        for path in files
        for line, name in _imports(path)
        if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)
    ]


def test_only_the_cli_imports_the_compiler() -> None:
    allowed = (ROOT / "sidegate" / "compiler", ROOT / "sidegate" / "cli")
    outside = [path for path in _modules("sidegate", *SIDECARS) if not any(path.is_relative_to(a) for a in allowed)]
    assert _crossings(outside, ("sidegate.compiler", "sidegate.versioning")) == []


def test_no_sidecar_and_no_core_module_imports_the_cli() -> None:
    outside = [path for path in _modules("sidegate", *SIDECARS) if not path.is_relative_to(ROOT / "sidegate" / "cli")]
    # The sidecars' own ``__main__`` start the kernel the way ``sidegate serve`` does.
    outside = [path for path in outside if path.name != "__main__.py"]
    assert _crossings(outside, ("sidegate.cli",)) == []


def test_the_config_model_imports_no_sidecar() -> None:
    assert _crossings(_modules("sidegate/config"), SIDECARS) == []


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("import os\nfrom sidegate.compiler import routes\nimport sidegate.compilers\n")
    assert _crossings([module], ("sidegate.compiler",)) == [
        f"{module}:2: sidegate.compiler",
        f"{module}:2: sidegate.compiler.routes",
    ]
