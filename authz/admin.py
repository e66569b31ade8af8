"""The key-management gRPC API (``sidegate.admin.v1.KeyAdmin``): ``KeyService`` over the wire.

Served by authz on its own port (``SIDEGATE_ADMIN_PORT``), never on the port Envoy calls.
Every call must carry ``authorization: Bearer <admin token>``; one without it is refused with
UNAUTHENTICATED and the refusal is audited. Bad input is INVALID_ARGUMENT, an unknown id
NOT_FOUND, a store outage UNAVAILABLE: the servicer never lets an exception escape.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from authz.apikeys import KeyRecord
from authz.errors import KeyNotFound, StoreUnavailable
from authz.keyservice import KeyService, NewKey
from authz.keystore import AuditEvent
from sidegate import logs
from sidegate.admin.v1 import keys_pb2 as pb
from sidegate.admin.v1 import keys_pb2_grpc
from sidegate.errors import StackError

log = logging.getLogger("authz.admin")
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def key_message(record: KeyRecord, now: float) -> pb.Key:
    fields = pb.Key.DESCRIPTOR.fields_by_name  # the record has more (e.g. ``revoked``) than the wire
    return pb.Key(**{k: v for k, v in record.public(now).items() if v is not None and k in fields})


def _issued(new: NewKey, now: float) -> pb.IssuedKey:
    return pb.IssuedKey(record=key_message(new.record, now), key=new.key)


class KeyAdmin(keys_pb2_grpc.KeyAdminServicer):
    def __init__(self, service: KeyService, token: str) -> None:
        self.service = service
        self._token = f"Bearer {token}".encode()

    async def _guard(self, context: Context, operation: str, work: Callable[[str], Awaitable[T]]) -> T:
        metadata = dict(context.invocation_metadata() or ())
        presented = str(metadata.get("authorization", "")).encode()
        actor = str(metadata.get("x-actor", "") or "anonymous")[:100]
        if not hmac.compare_digest(presented, self._token):
            event = AuditEvent(self.service.clock(), f"admin-api:{actor}", "admin_denied", detail=operation)
            try:
                await self.service.store.audit(event)
            except StoreUnavailable:
                log.warning("could not audit a refused admin call", extra=logs.fields(operation=operation))
            log.warning("admin call refused", extra=logs.fields(operation=operation, peer=context.peer()))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "admin token required")
        try:
            return await work(f"admin-api:{actor}")
        except KeyNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "key store unavailable")
        raise AssertionError("unreachable")  # abort() raises

    async def Create(self, request: pb.CreateRequest, context: Context) -> pb.IssuedKey:  # noqa: N802
        async def work(actor: str) -> pb.IssuedKey:
            new = await self.service.create(
                consumer=request.consumer,
                scopes=list(request.scopes),
                actor=actor,
                plan=request.plan or None,
                version=request.version or None,
                expires_in=request.expires_in_seconds or None,
            )
            return _issued(new, self.service.clock())

        return await self._guard(context, "create", work)

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:  # noqa: N802
        async def work(_actor: str) -> pb.ListResponse:
            now = self.service.clock()
            return pb.ListResponse(keys=[key_message(r, now) for r in await self.service.list_keys()])

        return await self._guard(context, "list", work)

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.Key:  # noqa: N802
        async def work(_actor: str) -> pb.Key:
            return key_message(await self.service.get(request.key_id), self.service.clock())

        return await self._guard(context, "get", work)

    async def Revoke(self, request: pb.RevokeRequest, context: Context) -> pb.Key:  # noqa: N802
        async def work(actor: str) -> pb.Key:
            record = await self.service.revoke(request.key_id, actor=actor, reason=request.reason)
            return key_message(record, self.service.clock())

        return await self._guard(context, "revoke", work)

    async def Rotate(self, request: pb.RotateRequest, context: Context) -> pb.RotateResponse:  # noqa: N802
        async def work(actor: str) -> pb.RotateResponse:
            if request.grace_seconds < 0:
                raise ValueError("grace_seconds must not be negative")
            retired, new = await self.service.rotate(request.key_id, actor=actor, grace=request.grace_seconds)
            now = self.service.clock()
            return pb.RotateResponse(retired=key_message(retired, now), successor=_issued(new, now))

        return await self._guard(context, "rotate", work)

    async def Audit(self, request: pb.AuditRequest, context: Context) -> pb.AuditResponse:  # noqa: N802
        async def work(_actor: str) -> pb.AuditResponse:
            events = await self.service.audit_log(request.limit or 1000)
            return pb.AuditResponse(
                events=[
                    pb.AuditEvent(
                        at=e.at,
                        actor=e.actor,
                        action=e.action,
                        key_id=e.key_id or "",
                        consumer=e.consumer or "",
                        detail=e.detail,
                    )
                    for e in events
                ]
            )

        return await self._guard(context, "audit", work)

    async def Export(self, request: pb.ExportRequest, context: Context) -> pb.ExportResponse:  # noqa: N802
        async def work(_actor: str) -> pb.ExportResponse:
            rows = await self.service.export()
            return pb.ExportResponse(records_jsonl="".join(json.dumps(r) + "\n" for r in rows))

        return await self._guard(context, "export", work)

    async def Import(self, request: pb.ImportRequest, context: Context) -> pb.ImportResponse:  # noqa: N802
        async def work(actor: str) -> pb.ImportResponse:
            try:
                rows = [json.loads(line) for line in request.records_jsonl.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON lines: {exc}") from None
            return pb.ImportResponse(imported=await self.service.import_records(rows, actor=actor))

        return await self._guard(context, "import", work)


async def start(service: KeyService, token: str, host: str, port: int) -> grpc.aio.Server:
    """The admin server on its own port (SO_REUSEPORT: every worker may serve it)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    keys_pb2_grpc.add_KeyAdminServicer_to_server(KeyAdmin(service, token), server)  # type: ignore[no-untyped-call]
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StackError(f"key admin API: cannot listen on {host}:{port} (address in use or not local)")
    await server.start()
    return server
