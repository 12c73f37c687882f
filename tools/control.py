"""The control server: `<state>/control.sock`, one `Connection` per client.

Design notes.
- A connection runs two tasks: the reader takes one line at a time, validates it, runs its
  operation and queues the reply; the writer sends queued messages in order. Replies and
  events share that one queue, so an event never splits a reply line. The queue is bounded:
  `push_event_nowait` never blocks the service, and a client that stops reading its events
  until the queue is full is disconnected (logged), not waited for.
- Requests on one connection run one after the other; connections run concurrently (the
  engine is thread-safe).
- Errors: a `ShadowblkError` becomes its code and message; any other exception is a bug,
  logged with its traceback and answered with `internal`; the connection goes on. Only a
  line over `protocol.MAX_LINE` (or the client going away) ends a connection.
- The socket is bound under a temporary name, chmod 0600, then renamed into place, so it
  is never reachable with a looser mode. A stale socket (nobody answers) is replaced; a live
  one is refused (the engine's state-dir lock makes that a should-not-happen).
"""

from __future__ import annotations

import logging
import os
import socket as stdsocket
from pathlib import Path
from typing import Any

import trio

from shadowblk.provider.errors import InvalidArgument, ShadowblkError
from shadowblk.provider.unixsock import identity as socket_identity
from shadowblk.provider.unixsock import remove_if_same, remove_stale_socket

from . import protocol
from .ops import HANDLERS, OpContext, current_events, current_releases, release_snapshots

log = logging.getLogger("shadowblk.control")

OUTGOING_QUEUE = 256
RECEIVE_SIZE = 65536


class LineTooLong(Exception):
    pass


class LineReader:
    """Splits a byte stream into lines of at most `limit` bytes (without the newline)."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int = protocol.MAX_LINE) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()
        self._eof = False

    async def readline(self) -> bytes | None:
        """The next line; a last line without newline counts; None at end of stream."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                return self._take(end, 1)
            if len(self._buffer) > self._limit:
                raise LineTooLong
            if self._eof:
                return self._take(len(self._buffer), 0) if self._buffer else None
            data = await self._stream.receive_some(RECEIVE_SIZE)
            self._eof = not data
            self._buffer += data

    def _take(self, end: int, skip: int) -> bytes:
        if end > self._limit:
            raise LineTooLong
        line = bytes(self._buffer[:end])
        del self._buffer[: end + skip]
        return line


class Connection:
    """One client of the control socket."""

    def __init__(self, stream: trio.SocketStream, ctx: OpContext, number: int) -> None:
        self.number = number
        self.requests = 0
        self._stream = stream
        self._ctx = ctx
        self._send, self._outgoing = trio.open_memory_channel[dict[str, Any]](OUTGOING_QUEUE)
        self._scope = trio.CancelScope()
        self.auto_release: list[str] = []  # snapshots that die with this connection

    def push_event_nowait(self, name: str, data: dict[str, Any]) -> None:
        """Queue an event for this client; disconnect it if it does not keep up."""
        try:
            self._send.send_nowait(protocol.event(name, data))
        except trio.WouldBlock:
            log.warning("control connection %d: event queue full, disconnecting", self.number)
            self.close_nowait()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close_nowait(self) -> None:
        """End this connection (its reply or event in flight is lost)."""
        self._scope.cancel()

    async def run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, nursery.cancel_scope)
                    async with self._send:
                        await self._read_loop()
        finally:
            with trio.CancelScope(shield=True):
                await self._stream.aclose()
                await self._release()

    async def _release(self) -> None:
        """Delete this connection's auto-release snapshots."""
        if self.auto_release:
            why = f"control connection {self.number} closed"
            await release_snapshots(self._ctx, self.auto_release, why)

    async def _read_loop(self) -> None:
        reader = LineReader(self._stream)
        while True:
            try:
                line = await reader.readline()
            except LineTooLong:
                message = f"request line longer than {protocol.MAX_LINE} bytes; closing"
                await self._send.send(protocol.reply_error(None, InvalidArgument.code, message))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if line is None:
                return
            if line.strip():
                self.requests += 1
                await self._send.send(await self.answer(line))

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        try:
            async for message in self._outgoing:
                await self._stream.send_all(protocol.encode(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # client gone, or queue closed: the reader stops too

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line."""
        rid = None
        try:
            message = protocol.decode_line(line)
            rid = protocol.request_id(message)
            request = protocol.validate_request(message)
            current_events.set(self.push_event_nowait)
            current_releases.set(self.auto_release)
            result = await HANDLERS[request.op](self._ctx, request.args)
        except ShadowblkError as exc:
            return protocol.reply_error(rid, exc.code, exc.message)
        except Exception as exc:
            log.exception("control connection %d: internal error on %r", self.number, line[:200])
            text = f"internal error ({type(exc).__name__}: {exc}); see the service log"
            return protocol.reply_error(rid, "internal", text)
        return protocol.reply_ok(rid, result)


class ControlServer:
    """Serves the control protocol on a unix socket until cancelled."""

    def __init__(self, ctx: OpContext) -> None:
        self.ctx = ctx
        self.connections: set[Connection] = set()
        self._accepted = 0

    def statistics(self) -> dict[str, Any]:
        return {"connections": len(self.connections), "accepted": self._accepted}

    def broadcast_nowait(self, name: str, data: dict[str, Any]) -> None:
        for conn in list(self.connections):
            conn.push_event_nowait(name, data)

    async def serve_unix(
        self, path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on `path`, report readiness, serve until cancelled, remove the socket."""
        sock = await bind_unix_socket(path)
        ident = socket_identity(path)
        try:
            async with trio.open_nursery() as nursery:
                listeners = [trio.SocketListener(sock)]
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started()
        finally:
            sock.close()
            remove_if_same(path, ident)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self._accepted += 1
        conn = Connection(stream, self.ctx, self._accepted)
        self.connections.add(conn)
        try:
            await conn.run()
        except Exception:
            log.exception("control connection %d failed", conn.number)
        finally:
            self.connections.discard(conn)


async def bind_unix_socket(path: Path, backlog: int = 64) -> trio.socket.SocketType:
    """A listening socket at `path`, mode 0600, replacing a stale socket."""
    await remove_stale_socket(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock


