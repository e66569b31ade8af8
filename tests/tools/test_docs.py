"""The docs cannot drift: every example in README.md and docs/ is checked against the code.

- Each ``yaml`` block of gateway.yaml is loaded by the real model, on top of a small base that
  gives it listeners and services.
- Each line of a ``sh`` block: a ``make`` target must exist; a ``sidegate`` command must be
  accepted by the CLI's parser, and the offline ones (``check``, ``envoy-config``) are run; a
  ``docker compose`` command must be one that tests/e2e/test_compose.py runs.
- Every file the docs link to exists, and the README stays a front door (under 200 lines).
- The README's bad-config line is what ``sidegate check`` prints for that mistake.

The README's tour itself (curl lines against ``sidegate up``) runs in tests/e2e/test_readme_tour.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidegate import cli, config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
BASE = {
    "listeners": [{"name": "http", "port": 8080}],
    "services": {
        "echo": {"endpoints": ["127.0.0.1:9080"]},
        "ledger": {"endpoints": ["127.0.0.1:9081"]},
        "orders": {"endpoints": ["127.0.0.1:9082"], "protocol": "grpc"},
    },
    "apis": [{"name": "base", "match": {"prefix": "/base"}, "service": "echo", "auth": {"anonymous": True}}],
}
RUN = {"check", "envoy-config"}  # offline and quick: run for real, from the repository's root


def blocks(kind: str) -> list[tuple[str, str]]:
    """(page:line, text) of every fenced block of ``kind``."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            if match.group(1) == kind:
                line = text[: match.start()].count("\n") + 1
                out.append((f"{page.relative_to(ROOT)}:{line}", match.group(2)))
    return out


def commands() -> list[tuple[str, list[str]]]:
    """(page:line, argv) of every command in a ``sh`` block, ``$(…)`` opened up, comments gone."""
    out = []
    for where, text in blocks("sh"):
        for raw in text.replace("\\\n", " ").splitlines():  # a trailing backslash continues the line
            line = raw.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            inner = re.search(r"\$\((.*)\)", line)
            out.append((where, shlex.split(inner.group(1) if inner else line)))
    return out


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_the_readme_is_a_front_door() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


def test_every_linked_file_exists() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


@pytest.mark.parametrize(("where", "text"), blocks("yaml"), ids=lambda v: v if ":" in str(v) else "")
def test_every_gateway_yaml_example_loads(where: str, text: str) -> None:
    fragment = yaml.safe_load(text)
    document = {**BASE, **fragment}
    config.parse(yaml.safe_dump(document, sort_keys=False), str(ROOT / "examples" / "docs.yaml"))


def test_every_command_in_the_docs_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*(?: [a-z][a-z-]*)*):", makefile, re.M))
    known = {t for line in targets for t in line.split()}
    compose_test = (ROOT / "tests" / "e2e" / "test_compose.py").read_text()
    checked = 0
    for where, argv in commands():
        if argv[0] == "make":
            assert argv[1] in known, f"{where}: make {argv[1]}: no such target"
        elif argv[0].endswith("sidegate"):
            try:
                cli.parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{where}: the CLI refuses {shlex.join(argv)}")
            if argv[1] in RUN:
                result = subprocess.run(
                    [sys.executable, "-m", "sidegate", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120
                )
                assert result.returncode == 0, f"{where}: {shlex.join(argv)}: {result.stderr[-1000:]}"
        elif argv[:2] == ["docker", "compose"]:
            verb = next(w for w in argv[2:] if not w.startswith("-"))
            assert f'"{verb}"' in compose_test, f"{where}: {shlex.join(argv)} is not run by a test"
        else:
            continue
        checked += 1
    assert checked >= 10


def test_the_readmes_bad_config_line_is_what_check_prints(tmp_path: Path) -> None:
    """The README shows the line a bad retries.attempts gives; it is the one ``sidegate check`` prints."""
    shown = re.search(r"^(examples/gateway\.yaml:\d+: services\.echo\.retries\.attempts: .*)$", _readme(), re.M)
    assert shown, "the README shows a bad gateway.yaml's line"
    bad = tmp_path / "examples" / "gateway.yaml"
    bad.parent.mkdir()
    text = (ROOT / "examples" / "gateway.yaml").read_text()
    assert text.count("attempts: 2,") == 1
    bad.write_text(text.replace("attempts: 2,", "attempts: 11,"))
    result = subprocess.run(
        [sys.executable, "-m", "sidegate", "check", "examples/gateway.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [shown.group(1)]
