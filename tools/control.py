"""The control server: `<state>/control.sock`, one `Connection` per client.

Design notes.
- A connection runs two tasks: the reader takes one line at a time, validates it, runs its
  operation and queues the reply; the writer sends queued messages in order. Replies and
  events share that one queue, so an event never splits a reply line. The queue is bounded:
  `push_event_nowait` never blocks the service, and a client that stops reading its events
  until the queue is full is disconnected (logged), not waited for.
- Every byte goes out through the connection's `Wire`: whole messages, in order, under a
  thread lock, with non-blocking writes only (what the socket does not take waits in the
  wire for the writer task). So an operation may send its reply straight from the thread
  that did its work (`ops.current_reply`): snapshot creation does, so its requester is not kept
  waiting for the event loop, busy with the writes the creation just released. Such an
  operation sends no events (they would queue behind its reply).
- Requests on one connection run one after the other; connections run concurrently (the
  engine is thread-safe).
- Errors: a `ShadowblkError` becomes its code and message; an `OSError` (failing storage)
  is `io-error` with its message; any other exception is a bug, logged with its
  traceback and answered with `internal`; the connection goes on. Only a
  line over `protocol.MAX_LINE` (or the client going away) ends a connection.
- The socket is bound under a temporary name, chmod 0600, then renamed into place, so it
  is never reachable with a looser mode. A stale socket (nobody answers) is replaced; a live
  one is refused (the engine's state-dir lock makes that a should-not-happen).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket as stdsocket
import threading
from functools import partial
from pathlib import Path
from typing import Any

import trio

from shadowblk.provider.errors import InvalidArgument, ShadowblkError, StorageFailure
from shadowblk.provider.unixsock import identity as socket_identity
from shadowblk.provider.unixsock import remove_if_same, remove_stale_socket

from . import protocol
from .ops import (
    HANDLERS,
    REPLIED,
    OpContext,
    current_events,
    current_releases,
    current_reply,
    release_snapshots,
)

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


class Wire:
    """A connection's outgoing bytes, from the event loop or from any thread: each message
    whole and in order. Writes never block: what the socket does not take now waits here
    (`backlog`) until the writer task, once the socket is writable, `flush`es it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._backlog = bytearray()
        self.broken = False  # the client went away (or the connection closed)

    def send(self, data: bytes) -> bool:
        """Write `data` after what waits already; True if nothing waits now."""
        with self._lock:
            if self.broken:
                return True
            self._backlog += data
            return self._write()

    def flush(self) -> bool:
        """Write what waits; True if nothing waits now (or nobody can read it)."""
        with self._lock:
            return self.broken or self._write()

    def _write(self) -> bool:
        while self._backlog:
            try:
                n = os.write(self._fd, self._backlog)
            except BlockingIOError:
                return False
            except OSError:  # EPIPE, ECONNRESET: the client is gone
                self.broken = True
                self._backlog.clear()
                return True
            del self._backlog[:n]
        return True

    def close(self) -> None:
        """No more writes (the socket is about to close: its fd number may be reused)."""
        with self._lock:
            self.broken = True
            self._backlog.clear()


class Connection:
    """One client of the control socket."""

    def __init__(self, stream: trio.SocketStream, ctx: OpContext, number: int) -> None:
        self.number = number
        self.requests = 0
        self._stream = stream
        self._ctx = ctx
        self._wire = Wire(stream.socket.fileno())
        self._token = trio.lowlevel.current_trio_token()
        # messages, or None: a worker thread left bytes in the wire for the writer
        self._send, self._outgoing = trio.open_memory_channel[dict[str, Any] | None](
            OUTGOING_QUEUE
        )
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
            self._wire.close()
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
                reply = await self.answer(line)
                if reply is not None:  # None: sent by the operation's thread already
                    await self._send.send(reply)

    async def _write_loop(self, scope: trio.CancelScope) -> None:
        wire = self._wire
        async for message in self._outgoing:
            done = wire.flush() if message is None else wire.send(protocol.encode(message))
            while not done:
                await trio.lowlevel.wait_writable(self._stream.socket)
                done = wire.flush()
            if wire.broken:
                break
        scope.cancel()  # client gone, or queue closed: the reader stops too

    def reply_from_thread(self, rid: Any, result: Any) -> None:
        """Send a request's reply from the thread that computed it (see Wire)."""
        if not self._wire.send(protocol.encode(protocol.reply_ok(rid, result))):
            with contextlib.suppress(trio.RunFinishedError):  # the service is stopping
                self._token.run_sync_soon(self._kick_writer)

    def _kick_writer(self) -> None:
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError,
                                 trio.BrokenResourceError):  # fmt: skip
            self._send.send_nowait(None)

    async def answer(self, line: bytes) -> dict[str, Any] | None:
        """The reply to one request line (None: the operation sent it, `current_reply`)."""
        rid = None
        try:
            message = protocol.decode_line(line)
            rid = protocol.request_id(message)
            request = protocol.validate_request(message)
            current_events.set(self.push_event_nowait)
            current_releases.set(self.auto_release)
            current_reply.set(partial(self.reply_from_thread, rid))
            result = await HANDLERS[request.op](self._ctx, request.args)
        except ShadowblkError as exc:
            return protocol.reply_error(rid, exc.code, exc.message)
        except OSError as exc:  # the storage failed (an origin, a diff area): not a bug
            log.error("control connection %d: %r failed: %s", self.number, line[:200], exc)
            return protocol.reply_error(rid, StorageFailure.code, str(exc))
        except Exception as exc:
            log.exception("control connection %d: internal error on %r", self.number, line[:200])
            text = f"internal error ({type(exc).__name__}: {exc}); see the service log"
            return protocol.reply_error(rid, "internal", text)
        if result is REPLIED:
            return None
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


