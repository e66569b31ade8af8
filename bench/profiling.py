"""Where the sidecars' time goes: py-spy samples the sidecar server and its workers under load.

``sidegate bench --profile full-chain`` adds a phase to that scenario (after the measured ones,
so sampling never skews a reported number): saturation load while ``py-spy record
--subprocesses --nonblocking`` samples every worker, then a summary of py-spy's collapsed stacks:
the hottest lines by own samples, and the hottest project functions including their callees.
Only running threads are sampled (py-spy leaves idle ones out), so the percentages are shares
of the sidecars' CPU time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.load import HARD_STOP, BenchError

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("authz/", "ratelimit/", "extproc/", "sidegate/")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise BenchError("py-spy is missing: make install (it installs every extra of the lock)")
    return found


def record(pid: int, seconds: float, output: Path, load: Callable[[], object]) -> dict[str, Any]:
    """Sample ``pid`` and its children for about ``seconds`` while ``load()`` runs; the summary."""
    argv = [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "200"]
    argv += ["--duration", str(int(seconds) + 1), "--format", "raw", "--output", str(output)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    err = b""
    try:
        time.sleep(0.5)  # let it attach to every worker
        load()
        _, err = spy.communicate(timeout=seconds + HARD_STOP)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not output.exists():
        raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace').strip()[-300:]}")
    return summarize(output.read_text(), output)


def summarize(text: str, path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks → samples, hottest lines (own time), hottest project functions."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [short(f) for f in stack.split(";") if f.endswith(")") and ".py:" in f]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + samples
        seen: set[str] = set()
        for frame in frames:
            function = re.sub(r":\d+\)$", ")", frame)  # the function, whichever line was running
            if frame.split("(")[-1].startswith(PROJECT) and function not in seen:
                seen.add(function)
                inclusive[function] = inclusive.get(function, 0) + samples

    def ranked(counts: dict[str, int]) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": frame, "percent": round(100 * n / total, 1)} for frame, n in best]

    return {"file": str(path), "samples": total, "self": ranked(own), "inclusive": ranked(inclusive)}


def short(frame: str) -> str:
    """``fn (/work/x/authz/servicer.py:12)`` → ``fn (authz/servicer.py:12)``; site-packages likewise."""
    frame = frame.replace(f"({ROOT}/", "(")
    return re.sub(r"\([^()]*/(?:site-packages|lib/python3\.\d+)/", "(", frame)


def text(profile: dict[str, Any]) -> str:
    """The summary for people: two ranked lists."""
    lines = [f"py-spy: {profile['samples']} samples of the sidecar workers ({profile['file']})", "  own time:"]
    lines += [f"    {row['percent']:5.1f}%  {row['frame']}" for row in profile["self"]]
    lines.append("  project functions, including what they call:")
    lines += [f"    {row['percent']:5.1f}%  {row['frame']}" for row in profile["inclusive"]]
    return "\n".join(lines)
