"""Reading a compiled Envoy bootstrap in the tests: what its clusters point at, what files it reads."""

from __future__ import annotations

from typing import Any


def endpoints(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    """A cluster's endpoints as (host, port); a worker's Unix socket is (``unix:PATH``, 0)."""
    out = []
    for group in cluster["load_assignment"]["endpoints"]:
        for lb in group["lb_endpoints"]:
            address = lb["endpoint"]["address"]
            if "pipe" in address:
                out.append((f"unix:{address['pipe']['path']}", 0))
            else:
                socket = address["socket_address"]
                out.append((str(socket["address"]), int(socket["port_value"])))
    return out


def tls_files(node: object) -> set[str]:
    """Every ``filename`` under ``node`` (TLS certificate chains and keys)."""
    if isinstance(node, dict):
        own = {str(node["filename"])} if "filename" in node else set()
        return own.union(*(tls_files(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(tls_files(v) for v in node))
    return set()
