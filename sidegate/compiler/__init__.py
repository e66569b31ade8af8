"""Compile a ``Gateway`` into an Envoy v3 bootstrap (plain dicts, dumped as YAML).

Filter order in every listener: ext_authz → ratelimit → ext_proc → router. Each route turns
off the filters it does not need (``disabled`` per route), so Envoy makes no callout that
cannot change the outcome. Routes are ordered most specific first. The compiler checks its
own references: ``envoy --mode validate`` does not notice a gRPC service naming a missing
cluster.

The modules, in the order a bootstrap is built:

- ``envoy``: Envoy's spellings (type URLs, filter names, durations, the one match helper)
- ``specs``: what a route is before it is YAML (``Target``, ``Answer``)
- ``versions``: a versioned API's routes, as specs
- ``routes``: specs into Envoy routes, the route table, rate-limit actions
- ``clusters``: upstream services, the sidecars, the OTLP collector
- ``bootstrap``: filters, listeners, the bootstrap, file-based xDS, the YAML text

Only the CLI (``sidegate/cli/``, ``sidegate up`` included) imports this package. The names Envoy
sends back to the sidecars live in ``sidegate.contract``.
"""

from __future__ import annotations

from sidegate.compiler.bootstrap import compile_bootstrap, file_xds, json_text, render
from sidegate.compiler.clusters import SIDECAR_CLUSTER, service_cluster
from sidegate.compiler.envoy import duration
from sidegate.compiler.routes import route

__all__ = [
    "SIDECAR_CLUSTER",
    "compile_bootstrap",
    "duration",
    "file_xds",
    "json_text",
    "render",
    "route",
    "service_cluster",
]
