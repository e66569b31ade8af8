"""Envoy RateLimitService servicer: ShouldRateLimit → RateLimitResponse.

Walking skeleton: every descriptor is under its limit (OK). Limits arrive with their issue.
"""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from sidegate.config import Gateway
from sidegate.settings import Settings

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
_OK = rls_pb2.RateLimitResponse.OK


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802
        statuses = [rls_pb2.RateLimitResponse.DescriptorStatus(code=_OK) for _ in request.descriptors]
        return rls_pb2.RateLimitResponse(overall_code=_OK, statuses=statuses)


async def setup(server: grpc.aio.Server, gateway: Gateway, settings: Settings) -> None:
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(), server)
