"""Metrics and traces of the sidecars.

**Metrics** are Prometheus metrics with bounded labels (reason codes, rule and API names from
gateway.yaml — never raw paths, key ids or consumers). A sidecar server runs N worker processes
behind one port, so counters live in ``prometheus_client``'s multiprocess files and one scrape
of ``SIDEGATE_METRICS_PORT`` (default 9464, served by the supervising process) sums every
worker. (The OpenTelemetry SDK's metric readers keep per-process state that no scrape could add
up across workers; the metric *names* are the contract in ops/, not the library.)

**Traces** use the OpenTelemetry SDK: each decision is one span continuing the W3C
``traceparent`` Envoy sends with its gRPC call, exported by OTLP/gRPC to
``SIDEGATE_OTLP_ENDPOINT``. With no endpoint, no provider is installed and a span costs a no-op.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXPORT_EVERY_MS = 1000  # spans leave in batches, off the request path

_pid = [os.getpid()]  # this process; a fork's child updates it (the hook below)


def _process() -> int:
    """Which process writes a metric: prometheus_client asks on every increment, and its default
    (``os.getpid``) is a system call each time, ~5 % of a sidecar's CPU. A pid only changes in a
    fork's child."""
    return _pid[0]


def _forked() -> None:
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_forked)
if os.environ.get(MULTIPROC_ENV):  # a worker: before any metric holds a value
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue(process_identifier=_process)  # type: ignore[no-untyped-call]

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

DECISIONS = Counter(
    "sidegate_decisions", "Decisions by sidecar, outcome and reason code.", ["sidecar", "outcome", "reason"]
)
DECISION_SECONDS = Histogram(
    "sidegate_decision_duration_seconds", "Time to decide, in the sidecar.", ["sidecar"], buckets=_BUCKETS
)
SHADOW_DENIALS = Counter(
    "sidegate_authz_shadow_denials",
    "Requests authz would have denied on an API in shadow mode, and let through.",
    ["api", "status", "reason"],
)
CACHE = Counter("sidegate_cache_requests", "Cache lookups by result.", ["sidecar", "cache", "result"])
STORE_ERRORS = Counter("sidegate_store_errors", "Errors from a backing store.", ["sidecar", "store"])
STORE_SECONDS = Histogram(
    "sidegate_store_duration_seconds", "Round trips to a backing store.", ["sidecar", "store"], buckets=_BUCKETS
)
STORE_DEGRADED = Gauge(
    "sidegate_store_degraded",
    "1 while a store's circuit breaker is open.",
    ["sidecar", "store"],
    multiprocess_mode="max",
)
RATELIMIT_HITS = Counter("sidegate_ratelimit_hits", "Rate-limit rule hits by result.", ["rule", "result"])
TRANSFORMS = Counter("sidegate_transforms", "Body transforms by API and outcome.", ["api", "outcome"])
RELOADS = Counter("sidegate_config_reloads", "Config reloads by outcome.", ["sidecar", "outcome"])

_propagator = TraceContextTextMapPropagator()
_tracing = False


def prepare_workers() -> str:
    """Before worker processes start: a fresh multiprocess directory they all write to."""
    directory = tempfile.mkdtemp(prefix="sidegate-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    return directory


def cleanup_workers(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.environ.pop(MULTIPROC_ENV, None)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104 - a scrape endpoint
    """The Prometheus scrape endpoint; with workers, the sum over all of them."""
    if not port:
        return
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, addr=host, registry=registry)
    else:
        start_http_server(port, addr=host)


def setup_tracing(service: str, endpoint: str | None) -> None:
    """Export spans by OTLP/gRPC to ``endpoint``; without one, tracing stays a no-op."""
    global _tracing  # noqa: PLW0603 - set once, at process start
    if not endpoint:
        return
    # Imported only when tracing is on: the exporter costs start-up time nobody else should pay.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create({"service.name": f"sidegate-{service}"}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_EVERY_MS))
    trace.set_tracer_provider(provider)
    _tracing = True


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def trace_id(traceparent: str) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``), for log lines."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def count(metric: Counter, *labels: str) -> None:
    """``metric.labels(*labels).inc()``, with the labelled child looked up once per label set."""
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    child.inc()


_decision_counters: dict[tuple[str, str, str], Any] = {}
_decision_timers: dict[str, Any] = {}


def decision(sidecar: str, outcome: str, reason: str, seconds: float) -> None:
    """Count one decision and its time. The labelled children are resolved once per label set:
    this runs on every request."""
    key = (sidecar, outcome, reason)
    counter = _decision_counters.get(key)
    if counter is None:
        counter = _decision_counters[key] = DECISIONS.labels(sidecar, outcome, reason)
    counter.inc()
    timer = _decision_timers.get(sidecar)
    if timer is None:
        timer = _decision_timers[sidecar] = DECISION_SECONDS.labels(sidecar)
    timer.observe(seconds)


def carrier(context: Any) -> dict[str, str]:
    """A gRPC call's invocation metadata as a text carrier for the trace-context propagator
    (empty while tracing is off: no work per request for a trace nobody collects)."""
    if not _tracing:
        return {}
    metadata = getattr(context, "invocation_metadata", None)
    pairs = metadata() if callable(metadata) else ()
    return {str(k): v for k, v in (pairs or ()) if isinstance(v, str)}


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)  # reusable: entering it does nothing


def span(name: str, carrier: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    """A span for one decision, child of the ``traceparent`` in ``carrier`` (gRPC metadata or
    request headers). Yields the span (a no-op one when tracing is off, at no cost per request)
    to set attributes on."""
    if not _tracing:
        return _NO_SPAN
    return _span(name, carrier)


@contextlib.contextmanager
def _span(name: str, carrier: Mapping[str, str]) -> Iterator[Any]:
    parent = _propagator.extract(carrier=dict(carrier))
    token = otel_context.attach(parent)
    try:
        with trace.get_tracer("sidegate").start_as_current_span(name, kind=trace.SpanKind.SERVER) as current:
            yield current
    finally:
        otel_context.detach(token)
