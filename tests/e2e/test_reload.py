"""Live reload: an edited gateway.yaml reaches Envoy and the sidecars with no request lost, and a
broken edit changes nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.conftest import LOGS
from tests.e2e.conftest import new_gateway

FRESH_API = """  - name: fresh
    match: {prefix: /fresh}
    service: echo
    auth: {api_key: true}
"""


def _stream(url: str, stop: threading.Event, statuses: Counter[int]) -> None:
    with httpx.Client() as client:
        while not stop.is_set():
            try:
                statuses[client.get(url).status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1  # type: ignore[index]
            time.sleep(0.003)


def test_live_edit_takes_effect_with_zero_failed_requests_and_a_bad_edit_changes_nothing(tmp_path: Path) -> None:
    gateway = new_gateway(tmp_path)
    stack = gateway.stack
    base = f"http://127.0.0.1:{gateway.ports['http']}"
    with stack.running():
        LOGS.extend(c.log_path for c in stack.children if c.log_path)
        assert httpx.get(f"{base}/fresh").status_code == 404
        statuses: Counter[int] = Counter()
        stop = threading.Event()
        steady = threading.Thread(target=_stream, args=(f"{base}/public/hello", stop, statuses))
        steady.start()
        try:
            time.sleep(0.3)
            original = stack.config_path.read_text()
            stack.config_path.write_text(original.replace("apis:\n", "apis:\n" + FRESH_API, 1))
            assert stack.reload()
            deadline = time.monotonic() + 5
            while httpx.get(f"{base}/fresh").status_code != 401 and time.monotonic() < deadline:
                time.sleep(0.05)
            fresh = httpx.get(f"{base}/fresh")
            assert fresh.status_code == 401
            assert fresh.json()["reason"] == "api_key_missing"  # authz knows the new API too
            time.sleep(0.3)

            edited = stack.config_path.read_text()
            stack.config_path.write_text(edited.replace("prefix: /fresh}", "prefix: fresh}"))  # invalid
            assert not stack.reload()
            time.sleep(1.5)  # longer than a poll: nothing may pick the bad file up
            assert httpx.get(f"{base}/fresh").json()["reason"] == "api_key_missing"
        finally:
            stop.set()
            steady.join(10)
        assert statuses[200] > 100
        assert statuses == Counter({200: statuses[200]}), statuses  # nothing failed during the reloads
        sidecar_log = next(c for c in stack.children if c.name.startswith("sidecars@")).tail(200)
        # `up` is the one watcher: its sidecar servers reloaded for the good edit (SIGHUP) and were
        # never told of the bad one, which `up` refused itself.
        assert '"msg":"config reloaded","why":"SIGHUP"' in sidecar_log
        assert '"why":"file changed"' not in sidecar_log
        assert "config not reloaded" not in sidecar_log
