"""The transmission phase: requests in, replies out (simple or structured), over one export.

Design notes
------------
The reader (`_read_loop`) parses a request header, receives a write's payload into a fresh
buffer of its size, and dispatches to the command table in commands.py, which also
computes what an export advertises (`transmission_flags`): the two must agree.

What runs where. Fast work runs inline in the reader, with no await between the parse and
the engine call: `pread`, `extents` (holes of a structured read), `write_nowait`,
`zero_nowait`. Blocking work runs in a worker thread from a child task (`start_blocking`),
so the reader goes on and replies go out of order: `flush`, `write` and `zero` when the
`_nowait` call said no (and `zero(fast=True)` for every FAST_ZERO: only it may refuse), the
flush of a FUA request, `cache`, and BLOCK_STATUS (its
dirty-bitmap look-ups may wait on the engine). At most MAX_BLOCKING such requests per
connection; then the reader waits for a slot.

The fast path. A client that pipelines small reads (fio, a guest's random reads) sends
many request headers in one segment. The reader receives whatever has arrived into the
wire's buffer (`Wire.fill`) and, before parsing a request the general way, serves the plain
READs at the head of that buffer straight from it (`reads.serve_buffered_reads`): no
coroutine per request, the engine's `pread` inline, the reply (data or error) queued. It
stops at the first request of any other kind, so requests are still served in the order
they came. At depth 8 this doubled 4 KiB random reads: the chain of per-request coroutines
cost more than the `pread`. Every request meets the fast path first, the first of a
segment too: receiving a header on its own had sent the first request of every segment
down the general path (segments held about four requests at depth 8), for 10 % more CPU
per request.

Replies go out batched: a reply made inline by the reader waits in the wire's queue until
the reader is about to wait for the client (wire.py, Batching); a child task's reply goes
out at once, taking the queue along.

Replies. Every request is answered exactly once, except NBD_CMD_DISC (none). Without
structured replies: a simple reply (with the data of a read). With them: a read is
answered with OFFSET_DATA / OFFSET_HOLE chunks (commands.py), BLOCK_STATUS with one chunk
per selected context, an error with an NBD_REPLY_TYPE_ERROR chunk carrying a message, and
any other success with a simple reply (allowed: it has no payload). A handler signals a
refusal by raising `RequestError`; an engine exception becomes one through `engine()`
(ShadowblkError and OSError by errno; anything else EIO, logged as a bug). A reply's parts
go out in one `Wire.send`, under the connection's send lock.

Ending. NBD_CMD_DISC, end of stream between requests, or a protocol error (bad magic, an
absurd write length, a stream cut mid-request) ends the read loop. `run` then waits for the
requests still in worker threads, except after a protocol error, where they are abandoned
(the nursery is cancelled; a worker thread still finishes its engine call).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from ..api import BlockDevice
from ..errors import ShadowblkError
from . import commands
from .codec import decode_request, encode_error_chunk, encode_simple_reply
from .protocol import (
    ABSURD_REQUEST_LENGTH,
    CMD_WRITE,
    MAX_REQUEST_LENGTH,
    NBD_EINVAL,
    NBD_EIO,
    REQUEST,
    Buffer,
    Disconnect,
    Request,
    RequestError,
    nbd_errno,
)
from .reads import serve_buffered_reads
from .session import Session
from .wire import PeerClosed, Wire

log = logging.getLogger(__name__)

MAX_BLOCKING = 16  # requests of one connection waiting on a worker thread
T = TypeVar("T")
Work = Callable[[], Sequence[Buffer] | None]  # in a thread: reply parts, or None for "ok"


class Transmission:
    _nursery: trio.Nursery

    def __init__(
        self, wire: Wire, device: BlockDevice, session: Session, counters: Counter[str]
    ) -> None:
        self.wire = wire
        self.device = device
        self.session = session
        self.counters = counters
        self.done = False  # set by NBD_CMD_DISC
        self._slots = trio.Semaphore(MAX_BLOCKING)
        self._reader: trio.lowlevel.Task | None = None

    async def run(self) -> None:
        """Serve until NBD_CMD_DISC, end of stream or a protocol error. Returns once every
        request received is answered (or, on a protocol error, abandoned)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._read_loop()
            except (Disconnect, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("nbd conn %d: dropped: %r", self.wire.ident, exc)
                nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        self._reader = trio.lowlevel.current_task()
        try:
            await self._serve_requests()
        finally:
            self._reader = None
        await self.wire.flush()

    async def _serve_requests(self) -> None:
        """Every request goes to the fast path first (`serve_buffered_reads`), straight
        from the receive buffer; the general path takes the first one it leaves."""
        wire = self.wire
        while not self.done:
            if serve_buffered_reads(self):
                await wire.flush()
                continue
            if len(wire.buffered()) < REQUEST.size:
                if not await self._fill():
                    return
                continue
            request = decode_request(await wire.receive_exactly(REQUEST.size))
            payload = await self._receive_payload(request)
            await self._dispatch(request, payload)

    async def _fill(self) -> bool:
        """Receive more of the stream; False when the client closed the connection
        between two requests."""
        try:
            await self.wire.fill()
        except PeerClosed as exc:
            if not exc.clean:
                raise
            log.debug("nbd conn %d: client closed without NBD_CMD_DISC", self.wire.ident)
            return False
        return True

    async def _receive_payload(self, request: Request) -> Buffer | None:
        """The request's payload; None if it was too large and has been discarded."""
        if request.type != CMD_WRITE or request.length == 0:
            return b""
        if request.length > ABSURD_REQUEST_LENGTH:
            raise Disconnect(f"write payload of {request.length} bytes")
        if request.length > MAX_REQUEST_LENGTH:
            await self.wire.discard(request.length)
            return None
        return await self.wire.receive_into(request.length)

    async def _dispatch(self, request: Request, payload: Buffer | None) -> None:
        try:
            if payload is None:
                raise RequestError(NBD_EINVAL, f"writes are limited to {MAX_REQUEST_LENGTH} bytes")
            handler = commands.handler_for(request, self.session)
            await handler(self, request, payload)
        except RequestError as exc:
            await self.reply_error(request, exc.error, exc.message)

    # Replies, for the command handlers.

    async def reply_ok(self, request: Request) -> None:
        self.counters["requests_served"] += 1
        await self._send(encode_simple_reply(0, request.handle))

    async def reply(self, request: Request, *parts: Buffer) -> None:
        """A successful reply made of `parts` (a simple reply with data, or chunks)."""
        self.counters["requests_served"] += 1
        await self._send(*parts)

    async def reply_error(self, request: Request, error: int, message: str) -> None:
        self.counters["requests_served"] += 1
        await self._send(self._error_reply(request, error, message))

    def reply_error_nowait(self, request: Request, exc: Exception) -> bool:
        """Queue the error reply for an engine exception (the reader's fast path, which
        counts its requests itself); False when the queue wants a flush."""
        error = self._request_error(exc, request)
        return self.wire.queue_nowait(self._error_reply(request, error.error, error.message))

    def _error_reply(self, request: Request, error: int, message: str) -> bytes:
        self.counters["request_errors"] += 1
        log.debug("nbd conn %d: %s: error %d: %s", self.wire.ident, request, error, message)
        if self.session.structured_replies:
            return encode_error_chunk(request.handle, error, message)
        return encode_simple_reply(error, request.handle)

    async def _send(self, *parts: Buffer) -> None:
        """Send a reply: batched when the reader makes it, at once from a child task."""
        await self.wire.send(*parts, batch=trio.lowlevel.current_task() is self._reader)

    def engine(self, request: Request, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call the engine inline; its exceptions become the request's `RequestError`."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            raise self._request_error(exc, request) from None

    def log_failure(self, request: Request, what: str, exc: BaseException | None = None) -> None:
        """Log an engine misbehaviour (a bug, not the client's fault)."""
        where = f"{commands.name_of(request)} {request.offset}+{request.length}"
        log.error("nbd conn %d: %s: %s", self.wire.ident, where, what, exc_info=exc)

    # Blocking work.

    async def start_blocking(
        self, request: Request, work: Work, retry: commands.Retry | None = None
    ) -> None:
        """Run `work` in a worker thread from a child task, then reply (see `Work`).
        `retry`: first wait in the task while the engine says the write waits for what
        ends by itself (a snapshot's hold), then apply it inline; `work` only if not."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self.wire.flush()  # the replies queued so far, before waiting on a slot
            await self._slots.acquire()
        self._nursery.start_soon(self._finish_blocking, request, work, retry)

    async def _finish_blocking(
        self, request: Request, work: Work, retry: commands.Retry | None
    ) -> None:
        try:
            try:
                if retry is not None and await _retried(retry):
                    parts = None
                else:
                    parts = await trio.to_thread.run_sync(work)
            except Exception as exc:
                error = self._request_error(exc, request)
                await self.reply_error(request, error.error, error.message)
                return
            if parts is None:
                await self.reply_ok(request)
            else:
                await self.reply(request, *parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("nbd conn %d: reply lost, connection closed", self.wire.ident)
        finally:
            self._slots.release()

    def _request_error(self, exc: Exception, request: Request) -> RequestError:
        """The NBD error for an engine exception; unexpected ones are logged as bugs."""
        if isinstance(exc, RequestError):
            return exc
        what = f"nbd conn {self.wire.ident}: {commands.name_of(request)} "
        what += f"{request.offset}+{request.length}"
        if isinstance(exc, ShadowblkError):
            log.info("%s: %s", what, exc)
            return RequestError(nbd_errno(exc.errno), exc.message)
        if isinstance(exc, OSError):
            log.warning("%s: %s", what, exc)
            return RequestError(nbd_errno(exc.errno), str(exc))
        log.error("%s: unexpected error", what, exc_info=exc)
        return RequestError(NBD_EIO, "internal error (logged by the server)")


async def _retried(retry: commands.Retry) -> bool:
    """Wait, in this task, each time the engine says the write waits for what ends by
    itself, and apply it inline once woken; False: it needs a worker thread after all.
    A worker thread per held write costs a thread hop each way, and at the end of a
    snapshot's hold they all wake at once, competing with the creation's reply."""
    token = trio.lowlevel.current_trio_token()
    while True:
        woken = trio.Event()
        if not retry.wait(partial(token.run_sync_soon, woken.set)):
            return retry.apply()
        await woken.wait()
        if retry.apply():
            return True
