"""The soak: the whole chain at a steady rate for a long time, watching every process for growth.

    .venv/bin/python -m bench.soak [--minutes 30] [--rate 150] [--sample 60]
    make soak                      # 30 minutes; make soak SOAK_MINUTES=2 for a short one

It starts a Redis of its own (keys and counters), and ``sidegate.cli.up.Stack`` on free ports:
Envoy, the sidecar server with two workers on Unix sockets, the echo upstream. Three constant-rate
drivers (``bench/driver.py``, HTTP/1.1 keep-alive) share the rate: an API key on a limited route
(authz and the rate-limit service, counted in Redis), an anonymous route limited per IP (the
rate-limit service alone), and a version transform (ext_proc on a JSON body both ways). Every
``--sample`` seconds it reads the resident memory (VmRSS) and open file descriptors of each
process from ``/proc``; at the end it prints one row per process: the first sample, the one at
the end of the warm-up (a tenth of the run), the last, and the growth over the whole run and
after the warm-up, then the requests by status and their latency. Everything it starts it stops,
by PID; traffic stays on 127.0.0.1. The table and every sample are written to
``.sidegate/soak/<time>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import DRIVER, free_port
from bench.stacks import issue_key, start_redis
from sidegate.cli.up import Stack
from sidegate.config import HostPort
from sidegate.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = """\
# The soak's gateway: every sidecar on the path, counters and keys in Redis.
listeners:
  - name: http
    port: $http
admin: {port: $admin}
sidecars:
  authz: {address: "unix:sidecars.sock", workers: 2}
  ratelimit: {address: "unix:sidecars.sock", workers: 2}
  extproc: {address: "unix:sidecars.sock", workers: 2}
services:
  echo:
    endpoints: ["127.0.0.1:$echo"]
    health_check: {path: /healthz, interval: 5s}
ratelimit: {on_store_error: allow}
apis:
  - name: orders
    match: {prefix: /orders}
    service: echo
    auth: {api_key: true}
    limits:
      - {by: consumer, requests: 1000000000, window: 1h}
  - name: public
    match: {prefix: /public}
    service: echo
    auth: {anonymous: true}
    limits:
      - {by: ip, requests: 1000000000, window: 1h}
  - name: widgets
    match: {prefix: /widgets}
    service: echo
    auth: {anonymous: true}
    versioning: {default: v2, header: api-version}
    versions:
      v1:
        served_by: v2
        changes:
          - rename: {from: name, to: title}
      v2: {prefix: /widgets}
"""
WIDGET = b'{"name": "soak", "sizes": [1, 2, 3], "note": "a steady body for the version transform"}'
MIB = 1024 * 1024


@dataclass
class Process:
    """One process to watch: its role and pid, and its samples (seconds, RSS bytes, fds)."""

    role: str
    pid: int
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    replaced: int = 0  # times another pid took this role (a restarted worker)


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """Resident memory (bytes) and open file descriptors of ``pid``; None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024, fds
    return None


def workers_of(server: int) -> list[int]:
    """The sidecar server's worker processes (spawned children of any of its threads)."""
    found = []
    for task in Path(f"/proc/{server}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text():
                    found.append(int(pid))
            except OSError:
                continue
    return sorted(found)


class Watch:
    """The processes of a running soak, found again at each sample (a worker may be replaced)."""

    def __init__(self, stack: Stack, redis_pid: int) -> None:
        self.stack = stack
        self.redis_pid = redis_pid
        self.processes: dict[str, Process] = {}

    def current(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        for child in self.stack.children:
            if child.proc is None:
                continue
            pids[child.name] = child.proc.pid
            if child.name.startswith("sidecars@"):
                for index, worker in enumerate(workers_of(child.proc.pid)):
                    pids[f"{child.name} worker {index}"] = worker
        pids["redis (the soak's own)"] = self.redis_pid
        return pids

    def sample(self, at: float) -> None:
        for role, pid in self.current().items():
            process = self.processes.setdefault(role, Process(role, pid))
            if process.pid != pid:
                process.pid, process.replaced = pid, process.replaced + 1
            found = rss_and_fds(pid)
            if found is not None:
                process.samples.append((at, *found))


@contextmanager
def soak_stack(workdir: Path) -> Iterator[tuple[Stack, int, str, dict[str, int]]]:
    """Redis and the stack on free ports; (stack, redis pid, API key, ports). Stops both."""
    redis, url = start_redis(workdir)
    stack: Stack | None = None
    try:
        ports = {name: free_port() for name in ("http", "admin", "echo")}
        config = workdir / "gateway.yaml"
        config.write_text(string.Template(GATEWAY).substitute(ports))
        settings = Settings(state_dir=workdir / "state", workers=2, redis_url=url, grace=2.0)
        stack = Stack(config, settings, echo=HostPort.model_validate(f"127.0.0.1:{ports['echo']}"), log_dir=workdir)
        stack.start()
        key = issue_key(stack.gateway, settings)
        assert redis.proc is not None
        yield stack, redis.proc.pid, key, ports
    finally:
        if stack is not None:
            stack.stop()
        redis.stop()


def drivers(
    workdir: Path, port: int, key: str, rate: float, seconds: float
) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """Three constant-rate drivers sharing ``rate``: (name, process)."""
    body = workdir / "widget.json"
    body.write_bytes(WIDGET)
    base = f"http://127.0.0.1:{port}"
    lanes: dict[str, tuple[str, str, list[str], Path | None]] = {
        "orders (authz + ratelimit)": (f"{base}/orders/1", "GET", [f"x-api-key: {key}"], None),
        "public (ratelimit)": (f"{base}/public/a", "GET", [], None),
        "widgets v1 (extproc)": (
            f"{base}/widgets/1",
            "POST",
            ["api-version: v1", "content-type: application/json"],
            body,
        ),
    }
    started = []
    for index, (name, (url, method, headers, payload)) in enumerate(lanes.items()):
        argv = [sys.executable, str(DRIVER), "--url", url, "--rate", f"{rate / len(lanes):g}"]
        argv += ["--seconds", f"{seconds:g}", "--connections", "16", "--method", method]
        argv += ["--log-file", str(workdir / f"driver-{index}.tsv")]
        for header in headers:
            argv += ["-H", header]
        if payload is not None:
            argv += ["--body-file", str(payload)]
        out = open(workdir / f"driver-{index}.out", "wb")  # noqa: SIM115 - closed with the process
        started.append((name, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)))
    return started


def _mib(value: int) -> str:
    return f"{value / MIB:.1f}"


def _signed_mib(value: int) -> str:
    return f"{value / MIB:+.1f}"


def table(watch: Watch, warm_up: float) -> str:
    """One row per process: RSS (MiB) and fds at the start, after the warm-up, at the end."""
    header = (
        "| process | RSS start | RSS warm | RSS end | RSS Δ | RSS Δ after warm-up | fds start | fds end | fds Δ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    )
    rows = list(header)
    for process in watch.processes.values():
        if not process.samples:
            continue
        first, last = process.samples[0], process.samples[-1]
        warm = next((s for s in process.samples if s[0] >= warm_up), last)
        name = process.role + (f" (replaced {process.replaced} times)" if process.replaced else "")
        rows.append(
            f"| {name} | {_mib(first[1])} | {_mib(warm[1])} | {_mib(last[1])} | {_signed_mib(last[1] - first[1])} "
            f"| {_signed_mib(last[1] - warm[1])} | {first[2]} | {last[2]} | {last[2] - first[2]:+d} |"
        )
    return "\n".join(rows)


def requests_summary(workdir: Path, lanes: list[tuple[str, subprocess.Popen[bytes]]]) -> str:
    rows = [
        "| lane | requests | by status | errored / timeout | p50 ms | p99 ms | max ms |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for index, (name, _) in enumerate(lanes):
        statuses: Counter[str] = Counter()
        latencies: list[int] = []
        log = workdir / f"driver-{index}.tsv"
        if log.exists():
            for line in log.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) == 3:
                    statuses[parts[1]] += 1
                    latencies.append(int(parts[2]))
        out = (workdir / f"driver-{index}.out").read_text(errors="replace").strip().splitlines()
        try:
            summary = json.loads(out[-1]) if out else {}
        except ValueError:
            summary = {}
        latencies.sort()

        def pct(q: float, ordered: list[int] = latencies) -> str:
            return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000:.1f}" if ordered else "-"

        by_status = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        failures = f"{summary.get('errored', '?')} / {summary.get('timeout', '?')}"
        rows.append(
            f"| {name} | {sum(statuses.values())} | {by_status} | {failures} | {pct(0.5)} | {pct(0.99)} | "
            f"{latencies[-1] / 1000 if latencies else '-'} |"
        )
    return "\n".join(rows)


def run(minutes: float, rate: float, every: float, workdir: Path) -> str:
    seconds = minutes * 60
    workdir.mkdir(parents=True, exist_ok=True)
    with soak_stack(workdir) as (stack, redis_pid, key, ports):
        watch = Watch(stack, redis_pid)
        lanes = drivers(workdir, ports["http"], key, rate, seconds)
        started = time.monotonic()
        samples = workdir / "samples.tsv"
        try:
            with samples.open("w") as out:
                out.write("seconds\tprocess\tpid\trss_bytes\tfds\n")
                next_sample = 0.0
                while any(proc.poll() is None for _, proc in lanes):
                    elapsed = time.monotonic() - started
                    if elapsed >= next_sample:
                        watch.sample(elapsed)
                        for process in watch.processes.values():
                            if process.samples and process.samples[-1][0] == elapsed:
                                _, rss, fds = process.samples[-1]
                                out.write(f"{elapsed:.0f}\t{process.role}\t{process.pid}\t{rss}\t{fds}\n")
                        out.flush()
                        total = sum(p.samples[-1][1] for p in watch.processes.values() if p.samples)
                        print(f"soak: {elapsed / 60:5.1f} of {minutes:g} min, RSS of all {_mib(total)} MiB", flush=True)
                        next_sample += every
                    if elapsed > seconds + 60:  # the drivers stop themselves; this is the backstop
                        for _, proc in lanes:
                            if proc.poll() is None:
                                proc.kill()
                    died = stack.died()
                    if died is not None:
                        print(f"soak: {died.name} exited: the stack's processes do not restart here", flush=True)
                    time.sleep(1.0)
                watch.sample(time.monotonic() - started)
        finally:
            for _, proc in lanes:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
        result = (
            f"Soak: {minutes:g} min at {rate:g} requests/s (three lanes), samples every {every:g} s; "
            f"RSS in MiB, warm = the first sample after {seconds / 10:.0f} s.\n\n"
            f"{table(watch, seconds / 10)}\n\n{requests_summary(workdir, lanes)}\n"
        )
    (workdir / "table.md").write_text(result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    parser.add_argument("--rate", type=float, default=150.0, help="requests per second in all (default 150)")
    parser.add_argument("--sample", type=float, default=60.0, help="seconds between samples (default 60)")
    parser.add_argument("--output", type=Path, default=None, help="folder for the samples and the table")
    args = parser.parse_args(argv)
    every = min(args.sample, max(1.0, args.minutes * 60 / 10))  # at least ten samples
    workdir = args.output or ROOT / ".sidegate" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    print(run(args.minutes, args.rate, every, workdir.absolute()))
    print(f"samples and table: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
