"""The sidecars' gRPC server: gRPC over cleartext HTTP/2, built to be cheap per call and hard to
abuse.

Why not ``grpc.aio``: its poller thread hands every completion to the event loop, three op
batches a call, and Envoy calls a sidecar on every request (``bench/grpc_floor.py`` compares
the two). This server parses frames where the bytes arrive, runs each call right there until it
waits, and writes every answer ready in one loop iteration with one syscall.

It speaks what Envoy and gRPC clients send: HTTP/2 with prior knowledge (no TLS: sidecars sit
on loopback or a pod network), HPACK, flow control both ways, PING, SETTINGS, RST_STREAM,
GOAWAY. Calls are unary or streaming in either direction, served by the handlers that
``*_pb2_grpc`` modules register through ``add_generic_rpc_handlers`` /
``add_registered_method_handlers``, so servicers do not know which server runs them. No
compression (Envoy sends none). The key-admin API and tests' helper servers stay on grpcio.

The package, from the wire up:

- ``frames``: frame and HPACK encodings, numbers from the RFCs.
- ``headers``: HPACK decoding, RFC 9113 §8 and gRPC header rules, the decoded-block cache.
- ``streams``: one stream's state machine (RFC 9113 §5.1) and its request messages.
- ``flow``: flow control both ways.
- ``connection``: one connection, sans I/O: bytes in, listener calls and bytes out.
- ``limits``: every bound on a peer, with its default.
- ``calls``: handlers found, run and answered; ``Context``.
- ``server``: sockets, the clock, ``Server``.
"""

from __future__ import annotations

from collections.abc import Sequence

from sidegate.grpc_h2c.calls import Context, HandlerCallDetails
from sidegate.grpc_h2c.limits import Limits
from sidegate.grpc_h2c.server import Server

__all__: Sequence[str] = ("Context", "HandlerCallDetails", "Limits", "Server")
