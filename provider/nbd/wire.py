"""One connection's byte stream: exact-size receives, message sends under a lock.

Only the connection's reader task receives, so receiving needs no lock. Any task may send
(the reader inline, a child task after blocking work): `send` holds the connection's send
lock for a whole message, so messages never interleave.

Batching. The reader may `send(..., batch=True)`: the message joins a queue instead of
going out at once. The queue is sent, in one system call, before the reader's next receive
that has to wait for the peer (a client that pipelines requests gets their replies
together), when it reaches BATCH_LIMIT bytes, by `flush`, and by any other task's send
(which takes it along). System calls are what a small request costs here: one send for
several replies instead of one each is most of the gain at queue depth 8.

No copies of payloads. A write's payload is received straight into a fresh bytearray of
its size (`receive_into`: recv_into on a socket); a reply's parts (header, data) go out in
one sendmsg on a socket, never concatenated when large. Over TLS the same calls go through
the `trio.SSLStream` (which copies into its records anyway).

Direct system calls. A trio socket operation always yields to the scheduler, even when it
could complete at once, and under a small-request load those yields cost more than the
system calls. On a plain socket a receive or send is first tried directly on the
non-blocking descriptor; only when it would block (or fails) does the call go through
trio, which then waits for the socket. So that the other tasks (the other connections,
the control socket) still get their turn, a connection goes direct for at most
DIRECT_SLICE after its last call through trio: the next call after that goes through trio
and yields. The descriptor is read from the socket at each call: -1 once it is closed,
which sends the call through trio and its ClosedResourceError.

STARTTLS: `start_tls` replaces `stream` with a `trio.SSLStream` over it, between two options,
when nothing is buffered (a client that sent bytes after NBD_OPT_STARTTLS before its reply
broke the protocol).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from .protocol import Buffer, Disconnect

RECEIVE_CHUNK = 64 * 1024  # ask the kernel for at least this much per small receive
RECEIVE_CAP = 4 * 1024 * 1024  # and never more than this (each receive allocates it)
JOIN_LIMIT = 64 * 1024  # parts of a message at most this long in all are joined: one send
IOV_BATCH = 512  # buffers per sendmsg (IOV_MAX is 1024 on Linux)
BATCH_LIMIT = 256 * 1024  # queued reply bytes that are sent without waiting for more
DIRECT_SLICE = 0.0002  # seconds a connection may run on direct system calls between yields


_A = TypeVar("_A")
_R = TypeVar("_R")


class PeerClosed(Disconnect):
    """The peer closed its end. `clean`: none of the bytes asked for had arrived (at a
    message boundary, when the caller asked for a message's first bytes)."""

    def __init__(self, clean: bool) -> None:
        super().__init__("peer closed the connection" + ("" if clean else " mid-message"))
        self.clean = clean


class Wire:
    def __init__(self, stream: trio.abc.Stream, ident: int = 0) -> None:
        self.stream = stream
        self.ident = ident  # connection number, for logs
        self.tls = False
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._queue: list[Buffer] = []  # batched messages' parts, not sent yet
        self._queued = 0  # their bytes
        self._yielded = 0.0  # time.monotonic() of the last call that went through trio

    # Receiving (the reader task only).

    async def receive_exactly(self, size: int) -> Buffer:
        """`size` bytes (a small message); raises `PeerClosed` at end of stream."""
        buffer = self._buffer
        if size == 0:
            return b""
        if not buffer:
            data = await self._receive(size, clean=True)
            if len(data) == size:
                return data
            buffer += data
        while len(buffer) < size:
            buffer += await self._receive(size - len(buffer), clean=False)
        message = buffer[:size]
        del buffer[:size]
        return message

    async def receive_into(self, size: int) -> bytearray:
        """`size` bytes into a fresh buffer of that size (a payload), with no other copy."""
        payload = bytearray(size)
        view = memoryview(payload)
        filled = min(size, len(self._buffer))
        view[:filled] = self._buffer[:filled]
        del self._buffer[:filled]
        sock = _socket_of(self.stream)
        while filled < size:
            if self._queue:
                await self.flush()
            if sock is not None:
                count = self._direct_call(os.readv, [view[filled:]])
                if count is None:
                    count = await _recv_into(sock, view[filled:])
            else:
                data = await self.stream.receive_some(min(size - filled, RECEIVE_CAP))
                count = len(data)
                view[filled : filled + count] = data
            if not count:
                raise PeerClosed(False)
            filled += count
        return payload

    async def discard(self, size: int) -> None:
        """Receive and drop `size` bytes without holding them all in memory."""
        while size:
            step = min(size, RECEIVE_CAP)
            await self.receive_exactly(step)
            size -= step

    async def _receive(self, wanted: int, *, clean: bool) -> Buffer:
        if self._queue:
            await self.flush()
        size = min(max(wanted, RECEIVE_CHUNK), RECEIVE_CAP)
        data: Buffer | None = self._direct_call(os.read, size)
        if data is None:
            data = await self.stream.receive_some(size)
        if not data:
            raise PeerClosed(clean)
        return data

    async def fill(self) -> None:
        """Receive what the peer has sent so far (at least one byte) into the buffer (see
        `buffered`); `PeerClosed` at end of stream, `clean` if nothing was buffered."""
        self._buffer += await self._receive(RECEIVE_CHUNK, clean=not self._buffer)

    def buffered(self) -> bytearray:
        """What has been received and not consumed yet (the reader may parse it in place
        and `consume` what it used)."""
        return self._buffer

    def consume(self, size: int) -> None:
        del self._buffer[:size]

    # Sending (any task).

    def queue_nowait(self, *parts: Buffer) -> bool:
        """Queue one message (the reader task only) without sending it; False once the
        queue holds BATCH_LIMIT bytes: time to `flush` (`send(batch=True)` then sends)."""
        self._queue += parts
        self._queued += sum(map(len, parts))  # no generator: once per read on the fast path
        return self._queued < BATCH_LIMIT

    def queue_full(self) -> bool:
        return self._queued >= BATCH_LIMIT

    async def send(self, *parts: Buffer, batch: bool = False) -> None:
        """Send one message, made of `parts` (a header, data, ...), as a unit, after the
        queued ones. `batch` (the reader task only): queue it instead, unless the queue
        is full (see Batching)."""
        if batch:
            if self.queue_nowait(*parts):
                return
            parts = ()
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if self._queue:
                parts = (*self._queue, *parts)
                self._queue, self._queued = [], 0
            await self._send_parts(parts)
        finally:
            self._send_lock.release()

    async def flush(self) -> None:
        """Send the queued messages now."""
        if self._queue:
            await self.send()

    async def _send_parts(self, parts: tuple[Buffer, ...]) -> None:
        sock = _socket_of(self.stream)
        if sock is None or sum(len(p) for p in parts) <= JOIN_LIMIT:
            parts = (b"".join(parts),)  # over TLS: one record rather than one per part
        if sock is not None and len(parts) > 1:
            views = [memoryview(p).cast("B") for p in parts if len(p)]
            sent = self._direct_call(os.writev, views[:IOV_BATCH])
            if sent is not None:
                _advance(views, sent)
            if views:
                await _sendmsg_all(sock, views)
            return
        for part in parts:
            sent = self._direct_call(os.write, part) if sock is not None else None
            if sent == len(part):
                continue
            await self.stream.send_all(memoryview(part)[sent:] if sent else part)

    def _direct_call(self, call: Callable[[int, _A], _R], arg: _A) -> _R | None:
        """`call(fd, arg)` on the plain socket's descriptor, at once, if it does not block
        and DIRECT_SLICE allows (see Direct system calls); None: go through trio (which
        yields)."""
        sock = _socket_of(self.stream)
        fd = -1 if sock is None else sock.fileno()
        now = time.monotonic()
        if fd >= 0 and now - self._yielded < DIRECT_SLICE:
            try:
                return call(fd, arg)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(f"{call.__name__} failed: {exc}") from exc
        self._yielded = now
        return None

    # TLS.

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS (server side) and complete the TLS handshake."""
        if self._buffer:
            raise Disconnect("client sent data before the reply to NBD_OPT_STARTTLS")
        stream = trio.SSLStream(self.stream, context, server_side=True)
        self.stream = stream
        self.tls = True
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise Disconnect(f"TLS handshake failed: {exc.__cause__ or exc}") from None


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    return stream.socket if isinstance(stream, trio.SocketStream) else None


async def _recv_into(sock: trio.socket.SocketType, view: memoryview) -> int:
    try:
        return await sock.recv_into(view, min(len(view), RECEIVE_CAP))
    except OSError as exc:
        raise trio.BrokenResourceError(f"receive failed: {exc}") from exc


async def _sendmsg_all(sock: trio.socket.SocketType, views: list[memoryview]) -> None:
    """sendmsg until every byte of `views` is sent (the caller holds the send lock)."""
    while views:
        try:
            sent = await sock.sendmsg(views[:IOV_BATCH])
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc
        _advance(views, sent)


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop the first `sent` bytes of `views` (the buffers of a partial send)."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views.pop(0)
    if sent:
        views[0] = views[0][sent:]
