"""The demo gRPC upstream: ``sidegate.demo.v1.Orders`` (protos/sidegate/demo/v1/orders.proto), in memory.

What the REST/JSON ⇄ gRPC translation of extproc is shown and tested against: unary methods
with path, query and body fields, and real gRPC errors — NOT_FOUND for an unknown order,
INVALID_ARGUMENT for an order without a customer, ALREADY_EXISTS for a taken id,
FAILED_PRECONDITION for a stale ``expected_revision``. It serves the gRPC health service too.
Two orders exist at start (``o-1``, ``o-2``), so a first GET finds something.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import grpc
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from sidegate.demo.v1 import orders_pb2, orders_pb2_grpc

log = logging.getLogger("sidegate.demo_grpc")
SERVICE = "sidegate.demo.v1.Orders"
Context = grpc.aio.ServicerContext[Any, Any]


def _total(order: orders_pb2.Order) -> int:
    return sum(item.quantity * item.price_cents for item in order.items)


def _seed() -> dict[str, orders_pb2.Order]:
    orders = [
        orders_pb2.Order(
            id="o-1",
            customer="ada",
            items=[orders_pb2.LineItem(sku="bolt", quantity=3, price_cents=25)],
            status=orders_pb2.STATUS_PAID,
            labels={"channel": "web"},
        ),
        orders_pb2.Order(
            id="o-2",
            customer="grace",
            items=[orders_pb2.LineItem(sku="nut", quantity=10, price_cents=5)],
            status=orders_pb2.STATUS_NEW,
        ),
    ]
    for order in orders:
        order.total_cents = _total(order)
        order.revision = 1
    return {order.id: order for order in orders}


class Orders(orders_pb2_grpc.OrdersServicer):
    def __init__(self) -> None:
        self.orders = _seed()
        self._ids = itertools.count(len(self.orders) + 1)

    async def _find(self, order_id: str, context: Context) -> orders_pb2.Order:
        order = self.orders.get(order_id)
        if order is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no order {order_id!r}")
        assert order is not None
        return order

    async def GetOrder(self, request: orders_pb2.GetOrderRequest, context: Context) -> orders_pb2.Order:  # noqa: N802
        return await self._find(request.id, context)

    async def ListOrders(  # noqa: N802
        self, request: orders_pb2.ListOrdersRequest, context: Context
    ) -> orders_pb2.ListOrdersResponse:
        found = [
            order
            for order in self.orders.values()
            if (not request.customer or order.customer == request.customer)
            and (not request.status or order.status == request.status)
        ]
        if request.page_size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        return orders_pb2.ListOrdersResponse(orders=found[: request.page_size or None])

    async def CreateOrder(  # noqa: N802
        self, request: orders_pb2.CreateOrderRequest, context: Context
    ) -> orders_pb2.Order:
        order = orders_pb2.Order()
        order.CopyFrom(request.order)
        if not order.customer:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an order needs a customer")
        if not order.id:
            order.id = f"o-{next(self._ids)}"
        if order.id in self.orders:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"order {order.id!r} exists")
        order.status = order.status or orders_pb2.STATUS_NEW
        order.total_cents = _total(order)
        order.revision = 1
        self.orders[order.id] = order
        return order

    async def UpdateOrder(  # noqa: N802
        self, request: orders_pb2.UpdateOrderRequest, context: Context
    ) -> orders_pb2.Order:
        order = await self._find(request.id, context)
        if request.expected_revision and request.expected_revision != order.revision:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"order {request.id!r} is at revision {order.revision}, not {request.expected_revision}",
            )
        change = request.order
        if change.customer:
            order.customer = change.customer
        if change.items:
            del order.items[:]
            order.items.extend(change.items)
        if change.status:
            order.status = change.status
        order.labels.update(change.labels)
        order.note = change.note or order.note
        if request.notify:
            order.note = (order.note + " (customer notified)").strip()
        order.total_cents = _total(order)
        order.revision += 1
        return order

    async def DeleteOrder(  # noqa: N802
        self, request: orders_pb2.DeleteOrderRequest, context: Context
    ) -> empty_pb2.Empty:
        await self._find(request.id, context)
        del self.orders[request.id]
        return empty_pb2.Empty()


async def start(host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started server on ``host:port`` (0: any free port) and the port it got."""
    server = grpc.aio.server()
    orders_pb2_grpc.add_OrdersServicer_to_server(Orders(), server)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled (``sidegate demo-grpc``)."""
    server, bound = await start(host, port)
    log.info("demo gRPC upstream listening", extra={"fields": {"address": f"{host}:{bound}", "service": SERVICE}})
    if ready is not None:
        ready.set()
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(1)
