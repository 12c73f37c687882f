"""One connection's byte stream: exact-size receives through a buffer, sends under a lock.

Only the connection's reader task receives, so receiving needs no lock. Any task may send
(the reader inline, a child task after a flush): `send` holds the connection's send lock for
a whole message, so messages never interleave. STARTTLS (issue 3) will replace `stream` with
a `trio.SSLStream` over it, between two options, when the buffer is empty.
"""

from __future__ import annotations

import trio

from .protocol import Buffer, Disconnect

RECEIVE_CHUNK = 64 * 1024  # ask the kernel for at least this much per receive
RECEIVE_CAP = 4 * 1024 * 1024  # and never more than this (each receive allocates it)
JOIN_LIMIT = 64 * 1024  # smaller payloads are joined to their header: one send


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
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def receive_exactly(self, size: int) -> Buffer:
        """`size` bytes; raises `PeerClosed` at end of stream."""
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

    async def discard(self, size: int) -> None:
        """Receive and drop `size` bytes without holding them all in memory."""
        while size:
            step = min(size, RECEIVE_CAP)
            await self.receive_exactly(step)
            size -= step

    async def _receive(self, wanted: int, *, clean: bool) -> Buffer:
        data = await self.stream.receive_some(min(max(wanted, RECEIVE_CHUNK), RECEIVE_CAP))
        if not data:
            raise PeerClosed(clean)
        return data

    async def send(self, header: bytes, payload: Buffer = b"") -> None:
        """Send one message (a header and an optional payload) as a unit."""
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if len(payload) <= JOIN_LIMIT:
                await self.stream.send_all(header + payload)
            else:
                await self.stream.send_all(header)
                await self.stream.send_all(payload)
        finally:
            self._send_lock.release()
