"""The transmission phase: requests in, simple replies out, over one export.

Commands are a table keyed by command type (`_COMMANDS`): handler, accepted command flags,
name. What an export advertises is computed in one place, `transmission_flags`; the two
must agree. The reader (`_read_loop`) parses a request header, receives its payload into a
buffer, and dispatches. Fast work runs inline in the reader, with no await between the
parse and the engine call: reads (`pread`) and writes the engine applies without blocking
(`write_nowait`). Blocking work (`flush`, `write` after `write_nowait` said no, the flush of
a FUA write) runs in a worker thread from a child task, so the reader goes on and replies
go out of order; at most MAX_BLOCKING such requests per connection (then the reader waits).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import trio

from ..api import BlockDevice
from ..errors import ShadowblkError
from .protocol import (
    ABSURD_REQUEST_LENGTH,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    MAX_REQUEST_LENGTH,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOSPC,
    NBD_EPERM,
    REQUEST,
    TFLAG_HAS_FLAGS,
    TFLAG_READ_ONLY,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
    Buffer,
    Disconnect,
    Request,
    decode_request,
    encode_simple_reply,
    nbd_errno,
)
from .wire import PeerClosed, Wire

log = logging.getLogger(__name__)

MAX_BLOCKING = 16  # requests of one connection waiting on a worker thread


@dataclass
class Session:
    """What the handshake negotiated, for the transmission phase."""

    fixed_newstyle: bool = False
    no_zeroes: bool = False
    # issue 3: structured_replies, meta_contexts, tls


def transmission_flags(device: BlockDevice, session: Session) -> int:
    """What `device` offers on this session; `_COMMANDS` must serve every flag set here."""
    flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA
    if device.readonly:
        flags |= TFLAG_READ_ONLY
    return flags


class Transmission:
    _nursery: trio.Nursery

    def __init__(
        self, wire: Wire, device: BlockDevice, session: Session, counters: Counter[str]
    ) -> None:
        self.wire = wire
        self.device = device
        self.session = session
        self.counters = counters
        self._slots = trio.Semaphore(MAX_BLOCKING)
        self._done = False

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
        while not self._done:
            request = await self._receive_request()
            if request is None:
                return
            payload = await self._receive_payload(request)
            await self._dispatch(request, payload)

    async def _receive_request(self) -> Request | None:
        """The next request; None when the client closed the connection between two."""
        try:
            header = await self.wire.receive_exactly(REQUEST.size)
        except PeerClosed as exc:
            if not exc.clean:
                raise
            log.debug("nbd conn %d: client closed without NBD_CMD_DISC", self.wire.ident)
            return None
        return decode_request(header)

    async def _receive_payload(self, request: Request) -> Buffer | None:
        """The request's payload; None if it was too large and has been discarded."""
        if request.type != CMD_WRITE:
            return b""
        if request.length > ABSURD_REQUEST_LENGTH:
            raise Disconnect(f"write payload of {request.length} bytes")
        if request.length > MAX_REQUEST_LENGTH:
            await self.wire.discard(request.length)
            return None
        return await self.wire.receive_exactly(request.length)

    async def _dispatch(self, request: Request, payload: Buffer | None) -> None:
        command = _COMMANDS.get(request.type)
        if command is None or request.flags & ~command.flags or payload is None:
            log.debug("nbd conn %d: invalid request %s", self.wire.ident, request)
            await self._reply(request, NBD_EINVAL)
        else:
            await command.handler(self, request, payload)

    async def _reply(self, request: Request, error: int, data: Buffer = b"") -> None:
        self.counters["requests_served"] += 1
        if error:
            self.counters["request_errors"] += 1
        await self.wire.send(encode_simple_reply(error, request.handle), data)

    # Commands. Each answers its request, inline or from a child task.

    async def _read(self, request: Request, payload: Buffer) -> None:
        end = request.offset + request.length
        if request.length > MAX_REQUEST_LENGTH or end > self.device.size:
            await self._reply(request, NBD_EINVAL)
        elif request.length == 0:
            await self._reply(request, 0)
        else:
            await self._read_inline(request)

    async def _read_inline(self, request: Request) -> None:
        try:
            data = self.device.pread(request.offset, request.length)
        except Exception as exc:
            await self._reply(request, self._error(exc, request))
            return
        if len(data) == request.length:
            await self._reply(request, 0, data)
        else:
            log.error("nbd conn %d: pread returned %d bytes", self.wire.ident, len(data))
            await self._reply(request, NBD_EIO)

    async def _write(self, request: Request, payload: Buffer) -> None:
        if self.device.readonly:
            await self._reply(request, NBD_EPERM)
        elif request.offset + request.length > self.device.size:
            await self._reply(request, NBD_ENOSPC)
        elif request.length == 0:
            await self._reply(request, 0)
        else:
            await self._write_inline(request, payload)

    async def _write_inline(self, request: Request, payload: Buffer) -> None:
        fua = bool(request.flags & CMD_FLAG_FUA)
        try:
            applied = self.device.write_nowait(request.offset, payload)
        except Exception as exc:
            await self._reply(request, self._error(exc, request))
            return
        if applied and not fua:
            await self._reply(request, 0)
        elif applied:
            await self._start_blocking(request, self.device.flush)
        else:
            work = partial(self._write_blocking, request.offset, payload, fua)
            await self._start_blocking(request, work)

    def _write_blocking(self, offset: int, payload: Buffer, fua: bool) -> None:
        """In a worker thread."""
        self.device.write(offset, payload)
        if fua:
            self.device.flush()

    async def _flush(self, request: Request, payload: Buffer) -> None:
        await self._start_blocking(request, self.device.flush)

    async def _disconnect(self, request: Request, payload: Buffer) -> None:
        """No reply; `run` returns once the requests in flight are answered."""
        self._done = True

    # Blocking work.

    async def _start_blocking(self, request: Request, work: Callable[[], None]) -> None:
        await self._slots.acquire()
        self._nursery.start_soon(self._finish_blocking, request, work)

    async def _finish_blocking(self, request: Request, work: Callable[[], None]) -> None:
        try:
            error = await self._in_thread(request, work)
            await self._reply(request, error)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("nbd conn %d: reply lost, connection closed", self.wire.ident)
        finally:
            self._slots.release()

    async def _in_thread(self, request: Request, work: Callable[[], None]) -> int:
        try:
            await trio.to_thread.run_sync(work)
        except Exception as exc:
            return self._error(exc, request)
        return 0

    def _error(self, exc: Exception, request: Request) -> int:
        """The NBD error for an engine exception; unexpected ones are logged as bugs."""
        name = _COMMANDS[request.type].name
        what = f"nbd conn {self.wire.ident}: {name} {request.offset}+{request.length}"
        if isinstance(exc, ShadowblkError):
            log.info("%s: %s", what, exc)
            return nbd_errno(exc.errno)
        if isinstance(exc, OSError):
            log.warning("%s: %s", what, exc)
            return nbd_errno(exc.errno)
        log.error("%s: unexpected error", what, exc_info=exc)
        return NBD_EIO


class _Command(NamedTuple):
    handler: Callable[[Transmission, Request, Buffer], Awaitable[None]]
    flags: int  # the command flags it accepts (FUA: every command, as the spec asks)
    name: str


_COMMANDS: dict[int, _Command] = {
    CMD_READ: _Command(Transmission._read, CMD_FLAG_FUA, "read"),
    CMD_WRITE: _Command(Transmission._write, CMD_FLAG_FUA, "write"),
    CMD_DISC: _Command(Transmission._disconnect, 0xFFFF, "disconnect"),
    CMD_FLUSH: _Command(Transmission._flush, CMD_FLAG_FUA, "flush"),
}
