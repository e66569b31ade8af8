"""A team's move from envoyproxy/ratelimit, end to end: real Envoy with its own hand-written
ratelimit filter config (as it was for the reference service), pointed at
``python -m ratelimit --reference-config examples/ratelimit-reference`` with the reference's
environment. Clients see the reference's answers: 429 from Envoy with no body of ours, and the
``RateLimit-*`` headers only because LIMIT_RESPONSE_HEADERS_ENABLED is set."""

from __future__ import annotations

import http.server
import os
import string
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest

from ratelimit import servicer
from sidegate.envoy_bin import envoy_binary
from sidegate.probes import envoy_ready, grpc_serving
from tests.conftest import LOGS, ROOT, free_port, wait_until

EXAMPLES = ROOT / "examples" / "ratelimit-reference"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ENVOY = string.Template("""\
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $admin}}
static_resources:
  listeners:
    - name: http
      address: {socket_address: {address: 127.0.0.1, port_value: $http}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": $hcm
                stat_prefix: ingress
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {prefix: "/"}
                          route:
                            cluster: upstream
                            rate_limits:
                              - actions:
                                  - request_headers: {header_name: x-to-number, descriptor_key: to_number}
                              - actions:
                                  - generic_key: {descriptor_key: message_type, descriptor_value: marketing}
                                  - request_headers: {header_name: x-to-number, descriptor_key: to_number}
                http_filters:
                  - name: envoy.filters.http.ratelimit
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
                      domain: messaging
                      failure_mode_deny: true
                      timeout: 2s
                      rate_limit_service:
                        transport_api_version: V3
                        grpc_service: {envoy_grpc: {cluster_name: ratelimit}}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: upstream
      type: STATIC
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $upstream}}}
    - name: ratelimit
      type: STATIC
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {http2_protocol_options: {}}
      load_assignment:
        cluster_name: ratelimit
        endpoints:
          - lb_endpoints:
              - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $ratelimit}}}
""")


class Upstream(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"upstream\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Envoy's base URL; behind it the upstream and the rate-limit service on the example folder."""
    workdir = tmp_path_factory.mktemp("reference")
    ports = {name: free_port() for name in ("admin", "http", "ratelimit")}
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    ports["upstream"] = upstream.server_address[1]
    bootstrap = workdir / "envoy.yaml"
    bootstrap.write_text(ENVOY.substitute(ports, hcm=HCM))
    environ = dict(
        os.environ, GRPC_PORT=str(ports["ratelimit"]), LIMIT_RESPONSE_HEADERS_ENABLED="true", USE_STATSD="false"
    )
    logs = {name: workdir / f"{name}.log" for name in ("ratelimit", "envoy")}
    LOGS.extend(logs.values())
    argv = [
        sys.executable,
        "-m",
        "ratelimit",
        "--reference-config",
        str(EXAMPLES),
        "--state-dir",
        str(workdir / "state"),
    ]
    with logs["ratelimit"].open("ab") as out:
        service = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=ROOT)
    envoy_proc: subprocess.Popen[bytes] | None = None
    try:
        wait_until(
            lambda: grpc_serving(f"127.0.0.1:{ports['ratelimit']}", servicer.RateLimitSidecar.service), 30, "ratelimit"
        )
        command = [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "warn"]
        with logs["envoy"].open("ab") as out:
            envoy_proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: envoy_ready(f"127.0.0.1:{ports['admin']}"), 30, "envoy")
        yield f"http://127.0.0.1:{ports['http']}"
    finally:
        if envoy_proc is not None:
            _stop(envoy_proc)
        _stop(service)
        upstream.shutdown()
        upstream.server_close()


def test_the_example_folder_served_unchanged_answers_through_envoy(envoy: str) -> None:
    number = uuid.uuid4().hex[:10]
    with httpx.Client(base_url=envoy) as client:
        replies = [client.get("/send", headers={"x-to-number": number}) for _ in range(6)]
    assert [r.status_code for r in replies] == [200] * 5 + [429]
    assert replies[0].text == "upstream\n"
    # The descriptor with the least remaining: marketing's 5 a day (not to_number's 100).
    assert (replies[0].headers["ratelimit-limit"], replies[0].headers["ratelimit-remaining"]) == ("5", "4")
    refused = replies[5]
    assert (refused.headers["ratelimit-limit"], refused.headers["ratelimit-remaining"]) == ("5", "0")
    assert 1 <= int(refused.headers["ratelimit-reset"]) <= 86_400
    assert refused.headers["x-envoy-ratelimited"] == "true"
    assert refused.content == b""  # the reference sends no body: Envoy's own empty 429
    assert "ratelimit-policy" not in refused.headers  # gateway.yaml's IETF fields are not sent
    assert "retry-after" not in refused.headers
