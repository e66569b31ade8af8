"""Installed packages that shadow each other: the failures show up far from their cause.

xds-protos installs its own, older copy of opentelemetry/proto/*, and `make install` then
reinstalls opentelemetry-proto so that its files win. Without that, the OTLP exporter cannot
import and tracing dies at start in every worker (seen on a clean clone).
"""

from __future__ import annotations

from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.common.v1 import common_pb2


def test_otlp_exporter_imports_beside_xds_protos() -> None:
    assert OTLPSpanExporter.__name__ == "OTLPSpanExporter"
    assert "InstrumentationScope" in common_pb2.DESCRIPTOR.message_types_by_name


def test_envoy_service_protos_still_import_beside_the_newer_opentelemetry_protos() -> None:
    for module in (opentelemetry_pb2, external_auth_pb2, external_processor_pb2, rls_pb2):
        assert module.DESCRIPTOR.name.endswith(".proto")
