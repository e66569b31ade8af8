"""Calls: a stream's request handed to the handler that ``*_pb2_grpc`` modules registered, run,
and its answer handed back to the connection.

``Dispatcher`` is the listener of every connection of one server (``connection.Listener``). Each
call runs right where its request became whole (``Dispatcher.run``: no task for a call answered
at once, none for a stream between its messages) until it waits for something else; then a task
takes it over. ``Call.end`` is the one way a call ends: an answer's trailers, or (the stream
already gone) nothing at all. ``grpc-timeout`` becomes the call's deadline: a call past it ends
with DEADLINE_EXCEEDED, and ``Context.time_remaining`` reports what is left.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, NamedTuple

import grpc

from sidegate import logs
from sidegate.grpc_h2c import frames
from sidegate.grpc_h2c.frames import INTERNAL_ERROR, MESSAGE
from sidegate.grpc_h2c.headers import Metadata, RequestHead
from sidegate.grpc_h2c.streams import OPEN, Stream

log = logging.getLogger("sidegate.grpc")

_CODES = {code.value[0]: code for code in grpc.StatusCode}


class HandlerCallDetails(NamedTuple):  # what grpc's generic handlers are asked with
    method: str
    invocation_metadata: Metadata


class _Abort(Exception):  # noqa: N818 - grpc.aio's is AbortError; this one never leaves the package
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Context:
    """The part of ``grpc.aio.ServicerContext`` the sidecars use."""

    __slots__ = ("_call", "code", "details")

    def __init__(self, call: Call) -> None:
        self._call = call
        self.code = grpc.StatusCode.OK
        self.details = ""

    def invocation_metadata(self) -> Metadata:
        return self._call.metadata

    def peer(self) -> str:
        return str(self._call.conn.peer)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline the client set with grpc-timeout (None: no deadline)."""
        deadline = self._call.deadline
        if deadline is None:
            return None
        now: float = self._call.conn.listener.loop.time()
        return max(0.0, deadline - now)

    async def write(self, message: Any) -> None:  # unary-stream handlers that write, as health's Watch
        self._call.send_message(message)

    def cancelled(self) -> bool:
        return self._call.cancelled


class Call(Stream):
    """One stream = one call: the stream's protocol state (``Stream``) and the call's own."""

    __slots__ = (
        "cancelled",
        "deadline",
        "done",
        "expired",
        "handler",
        "inbox",
        "metadata",
        "received",
        "started",
        "task",
        "timer",
    )

    def __init__(self, conn: Any, stream_id: int) -> None:
        # Stream's fields, set here rather than through super().__init__: one call less per call
        # (tests/unit/test_h2_core.py checks that both set the same fields).
        self.conn = conn
        self.id = stream_id
        self.state = OPEN
        self.send_window = self.recv_window = self.credit = self.held = self.weight = 0
        self.buffer: bytearray | None = None
        self.pending: list[tuple[bytes, bool]] | None = None
        self.queued = self.headers_sent = self.local_done = False
        self.progress = 0.0
        self.blocked_since = -1.0
        self.content_length = -1
        self.handler: Any = None
        self.metadata: Metadata = ()
        self.received: bytes | None = None  # a unary call's one request message
        self.inbox: _Inbox | None = None  # streaming requests
        self.task: asyncio.Task[None] | None = None
        self.done = False  # its end is decided: nothing more is sent but that end
        self.cancelled = False  # the stream is gone: nothing at all is sent
        self.started = False  # its handler was called
        self.deadline: float | None = None  # the event loop's clock
        self.timer: asyncio.TimerHandle | None = None
        self.expired = False

    def send_message(self, message: Any) -> None:
        if self.done:
            return
        self.conn.send_data(self, self._framed(message))

    def answer(self, message: Any) -> None:
        """A unary call's one response message and its OK trailers."""
        if self.done:
            return
        self.done = True
        self.conn.send_answer(self, self._framed(message))

    def _framed(self, message: Any) -> bytes:
        payload: bytes = self.handler.response_serializer(message) if self.handler.response_serializer else message
        return MESSAGE.pack(0, len(payload)) + payload

    def end(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        """The one way a call ends: its status in the trailers (once; nothing after)."""
        if self.done:
            return
        self.done = True
        block = frames.OK_TRAILERS if code is grpc.StatusCode.OK else frames.trailers(code.value[0], details)
        self.conn.send_trailers(self, block)

    def cancel(self) -> None:
        """The stream is gone (reset, timed out, or the connection lost): stop the call, send nothing."""
        self.done = self.cancelled = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
            self.conn.listener.calls.discard(self.task)  # it may never run to forget itself
        if self.inbox is not None and not self.interrupt():
            self.inbox.put(None)

    def interrupt(self) -> bool:
        """A parked call (waiting for its next message, no task) is cancelled now: True if it was."""
        if self.inbox is None or self.inbox.resume is None:
            return False
        resume, self.inbox.resume = self.inbox.resume, None
        resume(asyncio.CancelledError())
        return True

    def expire(self) -> None:
        """Its deadline passed: the handler is cancelled and the call ends DEADLINE_EXCEEDED."""
        self.timer = None
        if self.done:
            return
        self.expired = True
        if self.task is not None:
            self.task.cancel()
        elif not self.interrupt():
            self.end(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            self.cancel_handler()

    def cancel_handler(self) -> None:
        """Our answer is out early (an error): the handler, if it runs, need not go on."""
        if self.task is not None:
            self.task.cancel()
        elif self.inbox is not None and not self.interrupt():
            self.inbox.put(None)


_PARKED = object()  # what a call's coroutine yields to wait for its next message, task-free


class _Park:
    def __await__(self) -> Any:
        yield _PARKED


class _Inbox:
    """A streaming call's request messages (None: the client is done), for its one reader.

    A reader run by ``Dispatcher.run`` itself (the call's coroutine, before any task took it
    over) that finds it empty parks: ``put`` resumes it right where the message arrived. Any
    other reader (a task) waits on a future, as with ``asyncio.Queue`` (which one reader and no
    bound need not pay for)."""

    __slots__ = ("driving", "items", "loop", "resume", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: collections.deque[bytes | None] = collections.deque()
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.driving = False  # Dispatcher.run is running the call's coroutine right now
        self.resume: Callable[[BaseException | None], None] | None = None  # while it is parked

    def put(self, item: bytes | None) -> None:
        self.items.append(item)
        if self.resume is not None:
            resume, self.resume = self.resume, None
            resume(None)
            return
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> bytes | None:
        while not self.items:
            if self.driving:
                await _Park()
            else:
                self.waiter = self.loop.create_future()
                await self.waiter
        return self.items.popleft()


class Dispatcher:
    """Finds each call's handler and runs it; the listener of every connection of one server."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.methods: dict[str, Any] = {}
        self.generic: list[Any] = []
        self.calls: set[asyncio.Task[None]] = set()

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.methods[f"/{service}/{name}"] = handler

    def handler(self, path: str, metadata: Metadata) -> Any:
        found = self.methods.get(path)
        if found is None:
            details = HandlerCallDetails(path, metadata)
            for generic in self.generic:
                found = generic.service(details)
                if found is not None:
                    break
        return found

    # -- what connections tell us (connection.Listener) ------------------------------------

    def request(self, stream: Any, head: RequestHead, end_stream: bool) -> None:
        call: Call = stream
        call.metadata = head.metadata
        if head.timeout is not None:
            call.deadline = self.loop.time() + head.timeout
        handler = self.handler(head.path, head.metadata)
        if handler is None:
            call.end(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {head.path[:200]}")
            return
        call.handler = handler
        if handler.request_streaming:
            call.inbox = _Inbox(self.loop)
            if end_stream:  # no request message: it finds the end at once
                call.inbox.put(None)
            self.spawn(call)
        elif end_stream:
            self.spawn(call)

    def data(self, stream: Any, messages: list[bytes], end_stream: bool) -> int:
        call: Call = stream
        if call.done:
            return 0
        inbox = call.inbox
        if inbox is not None:  # a streaming call: its messages count as taken when it reads them
            for message in messages:
                inbox.put(message)
            if end_stream:
                inbox.put(None)
            return 0
        if messages:
            if call.received is not None or len(messages) > 1:
                call.end(grpc.StatusCode.INTERNAL, "a unary call takes one request message")
                return 0
            if end_stream:  # the common case: its handler takes the message right now
                call.received = messages[0]
                self.spawn(call)
                return len(messages[0]) + 5
            call.received = messages[0]
            return 0
        if end_stream:
            if call.received is not None:  # held since it came: taken now
                call.conn.consume(call, len(call.received) + 5)
            self.spawn(call)
        return 0

    def fail(self, stream: Any, code: int, details: str) -> None:
        call: Call = stream
        call.end(_CODES[code], details)
        call.cancel_handler()

    def reset(self, stream: Any) -> None:
        call: Call = stream
        call.cancel()

    # -- running calls ---------------------------------------------------------------------

    def spawn(self, call: Call) -> None:
        if call.handler is None or call.done:
            return
        call.started = True
        self.run(call, self.serve(call), contextvars.copy_context(), None)

    def run(self, call: Call, coro: Any, context: contextvars.Context, error: BaseException | None) -> None:
        """Run a call's coroutine, here and now, until it waits (as Python 3.12's eager tasks do).

        A call answered without waiting (authz, ratelimit) costs no task and no extra turn of
        the loop: its answer leaves with the others of this read. A call waiting for its next
        request message (ext_proc) parks until ``_Inbox.put`` runs it again, where the message
        arrived. Waiting for anything else, a task takes it over for good. So a handler's code
        up to its first such wait runs outside any task: ``asyncio.current_task()`` is None
        there, and ``asyncio.timeout`` belongs in a task of its own (the key cache, JWKS and
        introspection fetches, the Redis batches already are).
        """
        inbox = call.inbox
        if inbox is not None:
            inbox.driving = True
        try:
            waiting = context.run(coro.send, None) if error is None else context.run(coro.throw, error)
        except StopIteration:
            return
        finally:
            if inbox is not None:
                inbox.driving = False
        if call.deadline is not None and call.timer is None and not call.done:
            call.timer = self.loop.call_at(call.deadline, call.expire)
        if waiting is _PARKED and inbox is not None and not call.cancelled and not call.expired:
            inbox.resume = functools.partial(self.run, call, coro, context)
            return
        if waiting is _PARKED:  # cancelled meanwhile: stop it now
            self.run(call, coro, context, asyncio.CancelledError())
            return
        # Forgotten by serve itself (or by cancel, if it never ran): a done callback would cost
        # every call one more turn of the event loop.
        task = call.task = self.loop.create_task(_Resumed(coro, waiting), context=context)
        self.calls.add(task)

    async def serve(self, call: Call) -> None:
        try:
            await self._serve(call)
        except Exception:  # a bug of ours while answering: this call ends, the rest go on
            log.exception("unexpected error in a gRPC call", extra=logs.fields(method=_method_name(call.handler)))
            call.done = call.cancelled = True
            call.conn.reset_stream(call, INTERNAL_ERROR)
        finally:
            if call.timer is not None:
                call.timer.cancel()
                call.timer = None
            if call.task is not None:
                self.calls.discard(call.task)

    async def _serve(self, call: Call) -> None:
        handler = call.handler
        context = Context(call)
        try:
            if call.deadline is not None and self.loop.time() >= call.deadline:
                call.end(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                return
            if handler.request_streaming:
                requests = _requests(call, handler.request_deserializer)
                if handler.response_streaming:
                    await _stream_out(call, handler.stream_stream(requests, context))
                else:
                    call.send_message(await handler.stream_unary(requests, context))
            else:
                message = call.received
                if message is None:
                    call.end(grpc.StatusCode.INTERNAL, "expected one request message, got 0")
                    return
                call.received = None
                request = _parse(handler.request_deserializer, message)
                if handler.response_streaming:
                    await _stream_out(call, handler.unary_stream(request, context))
                else:
                    response = handler.unary_unary(request, context)
                    answer = await response if hasattr(response, "__await__") else response
                    if context.code is grpc.StatusCode.OK:
                        call.answer(answer)
                    else:
                        call.send_message(answer)
            call.end(context.code, context.details)
        except _Abort as abort:
            call.end(abort.code, abort.details)
        except _Unreadable:
            call.end(grpc.StatusCode.INVALID_ARGUMENT, "the request message cannot be parsed")
        except asyncio.CancelledError:
            if call.expired:
                call.end(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            elif not call.done:  # stopped by us, not reset by the client: say so
                call.end(grpc.StatusCode.CANCELLED, "server stopping")
        except NotImplementedError:  # generated servicer base classes: the method is not served
            code = context.code if context.code is not grpc.StatusCode.OK else grpc.StatusCode.UNIMPLEMENTED
            call.end(code, context.details or "method not implemented")
        except Exception:
            log.exception("unexpected error in a gRPC call", extra=logs.fields(method=_method_name(handler)))
            call.end(grpc.StatusCode.INTERNAL, "internal error")

    def sweep(self, streams: Iterable[Any], now: float) -> None:
        """Calls still waiting for their request past their deadline end DEADLINE_EXCEEDED
        (a call whose handler runs has a timer of its own)."""
        for call in list(streams):
            if call.deadline is not None and not call.started and now >= call.deadline:
                call.expire()


class _Resumed:
    """A call's coroutine, already run up to its first wait, as the coroutine a task drives:
    the task's first step gets that wait's future; everything else (a cancel before the first
    step included) goes to the call's coroutine, so its handler always hears of it."""

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Any, waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def send(self, value: Any) -> Any:
        waiting, self.waiting = self.waiting, None
        return waiting if waiting is not None else self.coro.send(value)

    def throw(self, *error: Any) -> Any:
        self.waiting = None
        return self.coro.throw(*error)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:  # not awaited: a task drives it through send and throw
        raise TypeError("a resumed call is driven by its task")


collections.abc.Coroutine.register(_Resumed)


class _Unreadable(Exception):  # noqa: N818 - a request message that is not what the method takes
    pass


def _parse(deserialize: Callable[[bytes], Any] | None, message: bytes) -> Any:
    if deserialize is None:
        return message
    try:
        return deserialize(message)
    except Exception as exc:
        raise _Unreadable from exc


async def _requests(call: Call, deserialize: Callable[[bytes], Any] | None) -> AsyncIterator[Any]:
    inbox = call.inbox
    assert inbox is not None
    while True:
        message = await inbox.get()
        if message is None:
            return
        call.conn.consume(call, len(message) + 5)  # read: the peer may send as much again
        yield _parse(deserialize, message)


async def _stream_out(call: Call, produced: Any) -> None:
    if hasattr(produced, "__aiter__"):
        async for message in produced:
            call.send_message(message)
    else:  # a coroutine that writes through its context (health's Watch)
        result = await produced
        if result is not None:
            call.send_message(result)


def _method_name(handler: Any) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind, None)
        if behaviour is not None:
            return getattr(behaviour, "__qualname__", kind)
    return "?"
