"""The demo upstream: an HTTP/1.1 echo service.

Every request is answered 200 with JSON naming the method, path, query, headers and body it
received (``GET /healthz`` answers ``{"status": "ok"}``), so a person or a test can see exactly
what Envoy and the sidecars sent upstream. With an ``x-echo-reflect`` request header it answers
the request body itself instead, like a service returning the resource it stored. Keep-alive,
``content-length`` and chunked request bodies are supported; anything else malformed gets a 400
and the connection is closed.

As a mesh demo service (``outbound`` given: its sidecar's outbound listener), a request with
``x-mesh-call: POST payments/charge, GET inventory/stock`` makes it call the first hop through
its sidecar (``Host: payments``), passing the rest of the list on, and put the answer it got
under ``"called"``: a chain of services, each seeing who called it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

log = logging.getLogger("sidegate.echo")
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
CALL_HEADER = "x-mesh-call"
# What a demo service passes on to the service it calls: the trace, the request id, the end
# user's token (the callee's sidecar may check it with authz), and the identity headers (the
# callee's sidecar strips them unless the caller is the gateway).
PASSED_ON = (
    "traceparent",
    "tracestate",
    "x-request-id",
    "authorization",
    "x-consumer-id",
    "x-consumer-plan",
    "x-auth-method",
)


class BadRequestError(Exception):
    pass


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadRequestError("bad chunk size") from None
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise BadRequestError("body too large")
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY:
        raise BadRequestError("bad content-length")
    return await reader.readexactly(int(length))


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str], list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequestError("bad request line") from None
    raw: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequestError("bad header line")
        raw.append((name.strip().lower(), value.strip()))
    headers: dict[str, str] = {}
    for name, value in raw:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return method, target, version, headers, raw


def echo_document(method: str, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    url = urlsplit(target)
    doc: dict[str, Any] = {
        "method": method,
        "path": url.path,
        "query": {k: v if len(v) > 1 else v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
        "headers": headers,
    }
    try:
        doc["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        doc["body_base64"] = base64.b64encode(body).decode("ascii")
    return doc


def _response(
    status: int,
    doc: object,
    *,
    close: bool,
    raw: bytes | None = None,
    content_type: str = "application/json",
    extra: dict[str, str] | None = None,
) -> bytes:
    payload = raw if raw is not None else (json.dumps(doc) + "\n").encode()
    reason = {200: "OK", 400: "Bad Request"}.get(status, "OK")
    lines = [f"HTTP/1.1 {status} {reason}", f"content-type: {content_type}", f"content-length: {len(payload)}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def _reflect(target: str, headers: dict[str, str], body: bytes, close: bool) -> bytes:
    """``x-echo-reflect``: answer the request body itself (a service that returns what it stored),
    saying in headers what arrived: the path and the body, compact, as this upstream saw them
    (line breaks escaped as ``\\n``: a header value holds none)."""
    received = body.decode("utf-8", "replace")[:4000].replace("\r", "\\r").replace("\n", "\\n")
    extra = {"x-echo-path": urlsplit(target).path, "x-echo-received": received}
    content_type = headers.get("content-type", "application/json")
    return _response(200, None, close=close, raw=body, content_type=content_type, extra=extra)


async def call_next(client: httpx.AsyncClient, outbound: str, headers: dict[str, str]) -> dict[str, Any]:
    """Make the first call ``x-mesh-call`` names, through the sidecar at ``outbound``; what came back."""
    first, _, rest = headers[CALL_HEADER].partition(",")
    method, _, target = first.strip().rpartition(" ")
    service, _, path = target.partition("/")
    passed = {name: headers[name] for name in PASSED_ON if name in headers}
    if rest.strip():
        passed[CALL_HEADER] = rest.strip()
    passed["host"] = service
    try:
        reply = await client.request(method or "GET", f"http://{outbound}/{path}", headers=passed)
    except httpx.HTTPError as exc:
        return {"service": service, "error": type(exc).__name__}
    try:
        body: object = reply.json()
    except ValueError:
        body = reply.text
    return {"service": service, "status": reply.status_code, "body": body}


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    client: httpx.AsyncClient | None = None,
    outbound: str | None = None,
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            try:
                method, target, version, headers, _ = _parse_head(head[:-4])
                body = await _read_body(reader, headers)
            except BadRequestError as exc:
                writer.write(_response(400, {"error": "bad_request", "message": str(exc)}, close=True))
                await writer.drain()
                return
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            if "x-echo-reflect" in headers:
                writer.write(_reflect(target, headers, body, close))
            else:
                health = method == "GET" and target == "/healthz"
                doc: dict[str, Any] = {"status": "ok"} if health else echo_document(method, target, headers, body)
                if client is not None and outbound is not None and CALL_HEADER in headers:
                    doc["called"] = await call_next(client, outbound, headers)
                writer.write(_response(200, doc, close=close))
            await writer.drain()
            if close:
                return
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


async def serve(host: str, port: int, ready: asyncio.Event | None = None, outbound: str | None = None) -> None:
    """Serve until cancelled; ``outbound`` (host:port of a mesh sidecar) makes it a mesh demo service."""
    client = httpx.AsyncClient(timeout=10.0, trust_env=False) if outbound else None
    handle = functools.partial(_handle, client=client, outbound=outbound)
    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD, reuse_address=True)
    try:
        async with server:
            log.info("echo upstream listening", extra={"fields": {"address": f"{host}:{port}"}})
            if ready is not None:
                ready.set()
            await server.serve_forever()
    finally:
        if client is not None:
            await client.aclose()
