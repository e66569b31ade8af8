"""A gateway.yaml of enterprise size, and what compiling it costs.

``python -m bench.scale --services 151 --apis 1200 -o big.yaml`` writes a gateway with a
realistic mix: a quarter of the APIs anonymous, a quarter behind API keys with scopes, a quarter
with a per-consumer limit, and a quarter versioned (v1 served by v2 through body changes). Every
API has its own prefix and service (round robin over the services), so the route table is as
long as the API list.

``python -m bench.scale --apis 1200 --measure`` also compiles it as `sidegate envoy-config`
and as `sidegate up` do, and prints a table: seconds, peak memory and bytes of each output.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from sidegate import compiler, config

KINDS = ("anonymous", "scoped", "limited", "versioned")


def gateway(services: int, apis: int) -> dict[str, Any]:
    """The gateway.yaml document: ``services`` upstreams and ``apis`` APIs over them."""
    doc: dict[str, Any] = {
        "listeners": [{"name": "https", "port": 8443, "tls": {}}, {"name": "http", "port": 8080}],
        "services": {
            f"svc{n:03d}": {
                "endpoints": [f"127.0.0.1:{10_000 + n}"],
                "retries": {"attempts": 2, "retry_on": ["connect-failure", "reset"]},
                "health_check": {"path": "/healthz", "interval": "5s"},
                "outlier_detection": {"consecutive_5xx": 5},
            }
            for n in range(services)
        },
        "plans": {"gold": {"limits": [{"requests": 100, "window": "1s"}]}},
        "apis": [api(n, f"svc{n % services:03d}") for n in range(apis)],
    }
    return doc


def api_prefix(n: int) -> str:
    return f"/api{n:04d}"


def last_of_kind(apis: int, kind: str) -> int:
    """The number of the last API of ``kind`` among ``apis``."""
    return max(n for n in range(apis) if KINDS[n % len(KINDS)] == kind)


def bench_template(services: int, apis: int) -> str:
    """The gateway as a ``sidegate bench`` template: every service is the bench's stub upstream,
    the sidecars on one TCP port, ``$http``/``$admin``/``$sidecars``/``$upstream`` filled in
    by the harness."""
    doc = gateway(services, apis)
    doc["listeners"] = [{"name": "http", "port": "$http"}]
    doc["admin"] = {"port": "$admin"}
    sidecar = {"address": "127.0.0.1:$sidecars", "timeout": "1s"}
    doc["sidecars"] = {"authz": sidecar, "ratelimit": {**sidecar, "failure_mode": "deny"}, "extproc": sidecar}
    for service in doc["services"].values():
        service["endpoints"] = ["127.0.0.1:$upstream"]
    text = yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False)
    return text.replace("'$http'", "$http").replace("'$admin'", "$admin")


def api(n: int, service: str) -> dict[str, Any]:
    kind = KINDS[n % len(KINDS)]
    spec: dict[str, Any] = {"name": f"api{n:04d}", "match": {"prefix": api_prefix(n)}, "service": service}
    if kind == "anonymous":
        spec["auth"] = {"anonymous": True}
    elif kind == "scoped":
        spec["auth"] = {"api_key": True, "scopes": {"GET": [f"api{n}:read"], "POST": [f"api{n}:write"]}}
    elif kind == "limited":
        spec["auth"] = {"api_key": True}
        spec["limits"] = [{"by": "consumer", "requests": 50, "window": "1s"}]
    else:
        spec["auth"] = {"api_key": True}
        spec["versioning"] = {"default": "v2", "header": "api-version", "path": True}
        spec["versions"] = {
            "v1": {"served_by": "v2", "changes": [{"rename": {"from": "name", "to": "title"}}]},
            "v2": {},
        }
    return spec


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: Path) -> list[tuple[str, float, float, int]]:
    """(step, seconds, peak MB so far, bytes written) for loading and each way of compiling."""
    rows = []
    start = time.perf_counter()
    loaded = config.load(path)
    rows.append(("load and validate", time.perf_counter() - start, _peak_mb(), 0))
    start = time.perf_counter()
    text = compiler.render(loaded, source=str(path))
    rows.append(("envoy-config (static YAML)", time.perf_counter() - start, _peak_mb(), len(text)))
    start = time.perf_counter()
    bootstrap = compiler.compile_bootstrap(loaded)
    main, files = compiler.file_xds(bootstrap, Path(tempfile.gettempdir()))
    size = sum(len(compiler.json_text(part)) for part in (main, *files.values()))
    rows.append(("up (file xDS as JSON)", time.perf_counter() - start, _peak_mb(), size))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=151)
    parser.add_argument("--apis", type=int, default=1200)
    parser.add_argument("--output", "-o", type=Path, help="where to write the gateway.yaml (default: a temp file)")
    parser.add_argument("--measure", action="store_true", help="compile it and print what that cost")
    args = parser.parse_args(argv)
    doc = gateway(args.services, args.apis)
    path = args.output or Path(tempfile.mkdtemp(prefix="sidegate-scale-")) / "gateway.yaml"
    path.write_text(yaml.dump(doc, Dumper=yaml.CSafeDumper, sort_keys=False))
    print(f"{path}: {args.services} services, {args.apis} APIs", file=sys.stderr)
    if args.measure:
        print("| step | seconds | peak MB | bytes |\n|---|--:|--:|--:|")
        for step, seconds, peak, size in measure(path):
            print(f"| {step} | {seconds:.2f} | {peak:.0f} | {size:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
