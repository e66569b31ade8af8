"""Worker metrics in prometheus_client's multiprocess files, with our cheap process identifier
(``sidegate.telemetry._process``): a forked child writes its own file, nothing is lost or mixed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from tests.conftest import ROOT

CHILD = """
import os, sys
from prometheus_client import values
from sidegate import telemetry
assert values.ValueClass is not values.MutexValue
telemetry.DECISIONS.labels("authz", "allow", "ok").inc(3)
pid = os.fork()
if pid == 0:
    telemetry.DECISIONS.labels("authz", "allow", "ok").inc(4)
    os._exit(0)
os.waitpid(pid, 0)
telemetry.DECISIONS.labels("authz", "allow", "ok").inc(5)
print(os.getpid(), pid)
"""


def test_a_forked_worker_counts_in_its_own_file_and_a_scrape_sums_them(tmp_path: Path) -> None:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    parent, child = done.stdout.split()
    assert sorted(p.name for p in tmp_path.glob("counter_*.db")) == sorted(
        [f"counter_{parent}.db", f"counter_{child}.db"]
    )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    scraped = generate_latest(registry).decode()
    assert 'sidegate_decisions_total{outcome="allow",reason="ok",sidecar="authz"} 12.0' in scraped
