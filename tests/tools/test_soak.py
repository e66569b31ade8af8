"""``make soak`` for a few seconds: the whole chain runs, every process is in the table, and
every request is answered 200."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_soak_prints_a_row_per_process_and_answers_every_request(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.soak", "--minutes", "0.2", "--rate", "30", "--output", str(tmp_path)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    for role in ("envoy", "echo", "sidecars@sidecars |", "worker 0", "worker 1", "redis"):
        assert role in table, table
    lanes = [line for line in table.splitlines() if line.startswith(("| orders", "| public", "| widgets"))]
    assert len(lanes) == 3, table
    for line in lanes:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2] == f"200: {cells[1]}", line  # every request answered 200
        assert cells[3] == "0 / 0", line
