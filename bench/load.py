"""Load generators and CPU accounting for ``sidegate bench``.

* ``H2load`` drives saturation: Debian's ``h2load`` (nghttp2-client, installed with apt-get when
  missing), HTTP/1.1 keep-alive, N connections, one request in flight on each, for a duration.
* ``RateDriver`` drives a fixed offered rate with ``bench/driver.py`` (open loop, wrk2-style:
  latency counted from when a request was due when it had to wait for a connection). Not
  ``h2load --rps``: its clients fire in step, so 50 clients at 20 requests/s send bursts of 50
  and bare Envoy shows a 5 ms median at 1,000 requests/s.

Both write one line per completed request (due or start µs, status, latency µs) and are run as
child processes whose CPU time comes from ``wait4``; every other process's CPU time comes from
``/proc/PID/stat`` (utime + stime, the process and all its descendants).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidegate.errors import SidegateError

HARD_STOP = 20.0  # seconds a load generator may outlive its duration before it is killed
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DRIVER = Path(__file__).resolve().with_name("driver.py")
Tick = Callable[[float, float], None]  # (elapsed, total seconds): called while a run goes on


class BenchError(SidegateError):
    """A scenario could not be run or measured; the message says why (and where the logs are)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_tool(binary: str, package: str) -> str:
    """The path of ``binary``; installs Debian's ``package`` with apt-get (as root) when missing."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError(f"{binary} is missing: install it with 'sudo apt-get install {package}'")
    print(f"bench: {binary} is missing; installing {package} with apt-get …", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        try:
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"{binary} is missing and '{' '.join(argv)}' failed: {exc}") from None
        if result.returncode != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["?"]
            raise BenchError(f"{binary} is missing and '{' '.join(argv)}' failed: {tail[0]}")
    found = shutil.which(binary)
    if found is None:
        raise BenchError(f"{binary} is still missing after installing {package}")
    return found


def run_quietly(argv: Sequence[str]) -> str:
    """A short command's output, or "" when it cannot run."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (result.stdout + result.stderr).strip()
    return ""


# --- CPU time -------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, CPU ticks: utime + stime + cutime + cstime) for every process now."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": fields[0] is the state
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    return table


def _tree(pids: list[int], table: dict[int, tuple[int, int]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _ticks) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid in table and pid not in out:
            out.append(pid)
            todo += children.get(pid, [])
    return out


def cpu_by_process(roots: list[int]) -> dict[int, float]:
    """CPU seconds so far of each process in the trees under ``roots`` (to see how work is spread)."""
    table = _proc_table()
    return {pid: table[pid][1] / CLOCK_TICKS for pid in _tree(roots, table)}


def cpu_seconds(roots: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group's processes and all their descendants.

    utime + stime of every live process in the tree (threads included), plus cutime + cstime:
    a child that exits and is reaped during a window moves its time into its parent's.
    """
    table = _proc_table()
    return {group: sum(table[pid][1] for pid in _tree(pids, table)) / CLOCK_TICKS for group, pids in roots.items()}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every core, /proc/stat), for the background share."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process (the harness itself)."""
    times = os.times()
    return times.user + times.system


# --- results ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One load run: status counts, latencies (µs) of the completed requests, its own CPU time."""

    seconds: float
    statuses: dict[str, int]
    latencies_us: list[int]
    errored: int
    timeout: int
    cpu_seconds: float
    command: str

    @property
    def done(self) -> int:
        return len(self.latencies_us)

    @property
    def rps(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def percentiles(self) -> dict[str, float]:
        """p50/p90/p99/p99.9/max in milliseconds (nearest rank); {} when nothing completed."""
        if not self.latencies_us:
            return {}
        ordered = sorted(self.latencies_us)
        last = len(ordered) - 1
        out = {
            name: ordered[min(last, int(q / 100 * len(ordered)))] / 1000
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99_9", 99.9))
        }
        out["max"] = ordered[-1] / 1000
        return out

    def errors(self, expected: int) -> dict[str, int]:
        """Every outcome that is not ``expected``, by status (and connection errors, timeouts)."""
        out = {status: n for status, n in self.statuses.items() if status != str(expected)}
        if self.errored:
            out["errored"] = self.errored
        if self.timeout:
            out["timeout"] = self.timeout
        return out


def _read_log(path: Path) -> tuple[dict[str, int], list[int]]:
    statuses: dict[str, int] = {}
    latencies: list[int] = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            statuses[parts[1]] = statuses.get(parts[1], 0) + 1
            latencies.append(int(parts[2]))
    return statuses, latencies


def _run_bounded(argv: list[str], out: Path, seconds: float, tick: Tick | None) -> tuple[int, float]:
    """Run a load generator (killed by PID past its bound); its exit status and CPU seconds."""
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    return proc.returncode, usage.ru_utime + usage.ru_stime
                elapsed = time.monotonic() - started
                if elapsed > seconds + HARD_STOP:
                    raise BenchError(
                        f"{Path(argv[0]).name} still running {elapsed:.0f}s into a {seconds:g}s run: killed"
                    )
                if tick is not None:
                    tick(min(elapsed, seconds), seconds)
                time.sleep(0.25)
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()


# --- the two load generators ----------------------------------------------------------------

_FINISHED = re.compile(r"finished in ([0-9.]+)(ms|s)")
_REQUESTS = re.compile(r"requests: .*?(\d+) errored, (\d+) timeout")


@dataclass(frozen=True)
class Request:
    url: str
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: Path | None = None  # a file holding the body


class H2load:
    """Saturation: h2load, HTTP/1.1 keep-alive, one thread, one request in flight on each of ``connections``."""

    def __init__(self, binary: str) -> None:
        self.binary = binary

    @classmethod
    def find(cls) -> H2load:
        return cls(ensure_tool("h2load", "nghttp2-client"))

    def version(self) -> str:
        return (run_quietly([self.binary, "--version"]).splitlines() or ["h2load"])[0]

    def run(
        self, request: Request, *, seconds: float, connections: int, workdir: Path, tick: Tick | None = None
    ) -> LoadResult:
        log = workdir / f"h2load-{time.monotonic_ns()}.tsv"  # h2load appends: always a new file
        argv = [self.binary, "--h1", "-t", "1", "-c", str(connections), "-m", "1", "-D", f"{round(seconds * 1000)}ms"]
        argv += ["-N", "10s", "--log-file", str(log)]
        for name, value in request.headers:
            # h2load sends its own Host beside a -H host: one: :authority replaces it instead.
            argv += ["-H", f"{':authority' if name.lower() == 'host' else name}: {value}"]
        if request.body is not None:
            argv += ["-d", str(request.body)]  # h2load POSTs it
        argv.append(request.url)
        out = workdir / "h2load.out"
        status, cpu = _run_bounded(argv, out, seconds, tick)
        text = out.read_text(errors="replace")
        if status != 0:
            raise BenchError(f"h2load exited with status {status}: {text.strip().splitlines()[-1:]}")
        finished = _FINISHED.search(text)
        if finished is None:
            raise BenchError(f"h2load printed no summary: {text[-300:]!r}")
        elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
        counts = _REQUESTS.search(text)
        statuses, latencies = _read_log(log) if log.exists() else ({}, [])
        log.unlink(missing_ok=True)
        return LoadResult(
            seconds=elapsed,
            statuses=statuses,
            latencies_us=latencies,
            errored=int(counts.group(1)) if counts else 0,
            timeout=int(counts.group(2)) if counts else 0,
            cpu_seconds=cpu,
            command=shlex.join(argv),
        )


class RateDriver:
    """A fixed offered rate: ``bench/driver.py`` as a child process (this Python, uvloop)."""

    def run(
        self,
        request: Request,
        *,
        rate: float,
        seconds: float,
        connections: int,
        workdir: Path,
        tick: Tick | None = None,
    ) -> LoadResult:
        log = workdir / f"driver-{time.monotonic_ns()}.tsv"
        argv = [sys.executable, str(DRIVER), "--url", request.url, "--rate", f"{rate:g}", "--seconds", f"{seconds:g}"]
        argv += ["--connections", str(connections), "--method", request.method, "--log-file", str(log)]
        for name, value in request.headers:
            argv += ["-H", f"{name}: {value}"]
        if request.body is not None:
            argv += ["--body-file", str(request.body)]
        out = workdir / "driver.out"
        status, cpu = _run_bounded(argv, out, seconds, tick)
        text = out.read_text(errors="replace")
        if status != 0:
            raise BenchError(f"the rate driver exited with status {status}: {text.strip()[-300:]}")
        try:
            summary = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise BenchError(f"the rate driver printed no summary: {text[-300:]!r}") from None
        statuses, latencies = _read_log(log)
        log.unlink()
        return LoadResult(
            # From the first request due to the last answer: a gateway that cannot keep up
            # stretches it, and done / seconds falls below the offered rate.
            seconds=max(float(summary["seconds"]), seconds),
            statuses=statuses,
            latencies_us=latencies,
            errored=int(summary["errored"]),
            timeout=int(summary["timeout"]),
            cpu_seconds=cpu,
            command=shlex.join(argv),
        )
