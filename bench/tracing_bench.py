"""Tracing overhead per decision span, off (the default: no provider) and on (SDK + OTLP batch).

    .venv/bin/python -m bench.tracing_bench

In-process and CPU time only (time.process_time): the cost a sidecar pays per decision for its
span. "On" exports to a closed local port, so spans are batched and dropped off the request
path, as when a collector is slow or away.
"""

from __future__ import annotations

import logging
import time

from sidegate import telemetry

CARRIER = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def cpu_us_per_span(n: int = 50_000) -> float:
    start = time.process_time()
    for _ in range(n):
        with telemetry.span("authz.check", CARRIER) as span:
            if span.is_recording():
                span.set_attribute("sidegate.outcome", "deny")
                span.set_attribute("sidegate.reason", "api_key_missing")
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    logging.disable(logging.WARNING)  # the exporter's complaints about the closed port
    off = cpu_us_per_span()
    telemetry.setup_tracing("bench", "127.0.0.1:9")
    on = cpu_us_per_span()
    print("| tracing | CPU µs per decision span |\n|---|---|")
    print(f"| off (default) | {off:.2f} |\n| on (100 % sampled, OTLP batch) | {on:.2f} |")


if __name__ == "__main__":
    main()
