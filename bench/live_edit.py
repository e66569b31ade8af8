"""A live edit of one API of a big gateway, under load, through real Envoy and ``sidegate up``.

``python -m bench.live_edit --apis 1200 --edits 3`` writes the ``bench.scale`` gateway with every
service on ``up``'s demo upstream, starts ``sidegate up`` on free loopback ports (the time to its
banner is the time to ready), and drives the first API's route from a few keep-alive clients
all along. Each edit renames a new gateway.yaml over the old one in which one API (the last
anonymous one) has a new prefix, and polls that prefix until it answers 200: the time from the
rename to that answer is the edit's time to apply. Then it prints every failed request of the
load (there must be none), the RSS of Envoy and of each sidecar worker, and stops ``up`` by its
PID. Run it at two sizes (``--apis 12`` and ``--apis 1200``) for the memory each API costs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench import scale

READY = "Ctrl-C stops everything."
RELOADED = "sidegate: reloaded"


class LogWatch:
    """The monotonic time ``up.log`` first holds more than ``seen`` lines with ``marker``."""

    def __init__(self, path: Path, marker: str, seen: int) -> None:
        self.path, self.marker, self.seen = path, marker, seen
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set() and self.at is None:
            if self.path.read_text(errors="replace").count(self.marker) > self.seen:
                self.at = time.monotonic()
            time.sleep(0.01)

    def __enter__(self) -> LogWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def document(services: int, apis: int, ports: dict[str, int], edited: int | None) -> dict[str, Any]:
    doc = scale.gateway(services, apis)
    doc["listeners"] = [{"name": "http", "port": ports["http"]}]
    doc["admin"] = {"port": ports["admin"]}
    for service in doc["services"].values():
        service["endpoints"] = [f"127.0.0.1:{ports['echo']}"]
        service.pop("health_check", None)  # the demo upstream answers 404 to /healthz
    if edited is not None:
        doc["apis"][edited]["match"]["prefix"] = f"/edited{edited:04d}-{time.monotonic_ns()}"
    return doc


def write(path: Path, doc: dict[str, Any]) -> float:
    """Write ``doc`` beside ``path`` and rename it over ``path``; the time of the rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False))
    os.replace(tmp, path)
    return time.monotonic()


def get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status


class Load:
    """Keep-alive clients asking one path in a loop; every answer counted by status."""

    def __init__(self, port: int, path: str, clients: int) -> None:
        self.port, self.path = port, path
        self.counts: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stopping.is_set():
            try:
                outcome = str(get(conn, self.path))
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            with self.lock:
                self.counts[outcome] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)


def wait_for(port: int, path: str, timeout: float) -> float:
    """Poll ``path`` until it answers 200; the time it did."""
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while time.monotonic() < deadline:
        try:
            if get(conn, path) == 200:
                return time.monotonic()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        time.sleep(0.002)
    raise TimeoutError(f"{path} did not answer 200 within {timeout}s")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_mb(pid: int) -> tuple[str, float]:
    """(the process's command, its RSS in MB)."""
    cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")).strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return cmd, int(line.split()[1]) / 1024
    return cmd, 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live_edit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=151)
    parser.add_argument("--apis", type=int, default=1200)
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="keep-alive clients of the load")
    parser.add_argument("--workers", type=int, default=2, help="sidecar worker processes")
    args = parser.parse_args(argv)
    ports = {name: free_port() for name in ("http", "admin", "echo")}
    folder = Path(tempfile.mkdtemp(prefix="sidegate-live-edit-"))
    path = folder / "gateway.yaml"
    write(path, document(args.services, args.apis, ports, None))
    edited = scale.last_of_kind(args.apis, "anonymous")
    argv_up = [sys.executable, "-m", "sidegate", "up", "--config", str(path), "--state-dir", str(folder / "state")]
    argv_up += ["--echo", f"127.0.0.1:{ports['echo']}", "--workers", str(args.workers)]
    argv_up += ["--admin-port", "0", "--metrics-port", "0", "--no-demo-grpc"]
    log = (folder / "up.log").open("wb")
    started = time.monotonic()
    up = subprocess.Popen(argv_up, stdout=log, stderr=subprocess.STDOUT)
    try:
        while READY not in (folder / "up.log").read_text(errors="replace"):
            if up.poll() is not None or time.monotonic() - started > 180:
                raise SystemExit(f"sidegate up did not start; see {folder / 'up.log'}")
            time.sleep(0.05)
        ready = time.monotonic() - started
        print(f"{args.apis} APIs: sidegate up ready in {ready:.2f} s ({folder})")
        load_path = scale.api_prefix(0) + "/orders"
        applied = []
        with Load(ports["http"], load_path, args.clients) as load:
            time.sleep(2.0)
            for _ in range(args.edits):
                doc = document(args.services, args.apis, ports, edited)
                prefix = doc["apis"][edited]["match"]["prefix"]
                seen = (folder / "up.log").read_text(errors="replace").count(RELOADED)
                with LogWatch(folder / "up.log", RELOADED, seen) as written:
                    renamed = write(path, doc)
                    answered = wait_for(ports["http"], prefix + "/x", timeout=60)
                applied.append((answered - renamed, (written.at or answered) - renamed))
                time.sleep(2.0)
        for seconds, files in applied:
            print(
                f"edit of one API ({scale.api_prefix(edited)} → a new prefix) applied in {seconds:.2f} s"
                f" (up wrote Envoy's files after {files:.2f} s; Envoy took the rest)"
            )
        failed = sum(n for status, n in load.counts.items() if status != "200")
        print(f"load on {load_path}: {sum(load.counts.values())} requests, {failed} failed {dict(load.counts)}")
        for pid in descendants(up.pid):  # Envoy, the sidecar server and its workers, the echo
            cmd, mb = rss_mb(pid)
            print(f"RSS {mb:6.1f} MB  pid {pid}  {cmd[:110]}")
        return 1 if failed else 0
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
