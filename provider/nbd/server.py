"""The built-in NBD server, on trio: a protocol adapter only.

It translates NBD requests into `BlockDevice` calls (offsets in, bytes or errors out); all
snapshot semantics live in the engine. Spec: NetworkBlockDevice/nbd doc/proto.md; what is
served, option by option and command by command: docs/nbd.md.

Design notes
------------
Layers. `NBDServer` owns the listeners and the statistics. Each accepted stream runs
`handle_stream`: a `Wire` (wire.py: buffered receive, locked send, STARTTLS upgrade), then
a `Handshake` (handshake.py, negotiate.py: options, recorded in a `Session`, session.py),
then, if an export was chosen, a `Transmission` (transmission.py, commands.py). Encoders
and decoders are in codec.py, numbers in protocol.py. Listener code (`serve_unix`,
`serve_tcp`) never touches the protocol; it only says whether TLS is required.

Listeners. The Unix socket (mode 0600) is always plain. A TCP listener (`serve_tcp`) is
plain only on loopback addresses; given an SSL context it requires TLS of every client
(FORCEDTLS: NBD_OPT_STARTTLS first, tls.py for the policy and the context).

States of a connection: GREETING → OPTIONS → TRANSMISSION → closed, or OPTIONS → closed
(NBD_OPT_ABORT, a malformed handshake, a refused NBD_OPT_EXPORT_NAME, a failed TLS
handshake). Whatever the way out, `handle_stream` closes the export first
(`BlockDevice.close`, shielded from cancellation, so a snapshot is always unpinned), then
the stream (after a TLS close_notify, bounded in time, when TLS is up).

What runs where. All protocol code runs in trio tasks. Engine calls that never block for
long run inline in the connection's reader task, with no await between parsing a request
and calling the engine (inline ~3 µs; a worker thread costs ~60 µs): `pread`, `extents`,
`write_nowait`, `zero_nowait`. Calls that may block run in worker threads
(`trio.to_thread.run_sync`): registry look-ups, `open_export`, `dirty_bitmaps` and `close`
during the handshake, and in transmission `flush`, `write`, `zero`, `cache` and block
status, each from a child task of the connection so the reader keeps reading and replies
go out of order.

Locking. One lock per connection, the send lock in `Wire`: a reply (all its parts and
chunks) is sent as a unit, by the reader or by a child task. Only the reader receives. The
engine is thread-safe and needs nothing from us; its flush is engine-wide, which is what
makes CAN_MULTI_CONN true. Counters change only in trio tasks (one thread);
`statistics()` returns a copy and may be called from any thread.

Failures stay in their connection: a protocol violation, a broken stream or a bug in a
handler ends that connection only (logged); `handle_stream` never raises except on
cancellation. An engine error in a request becomes that request's NBD error (ShadowblkError
by its errno; anything unexpected EIO, logged) and the connection goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from collections import Counter
from functools import partial
from typing import Any

import trio

from ..api import BlockDevice, ExportRegistry
from ..unixsock import identity as socket_identity
from ..unixsock import remove_if_same, remove_stale_socket
from .handshake import Handshake
from .negotiate import release_export
from .protocol import Disconnect
from .tls import check_listen_address
from .transmission import Transmission
from .wire import PeerClosed, Wire

log = logging.getLogger(__name__)

_CONNECTION_ENDS = (Disconnect, trio.BrokenResourceError, trio.ClosedResourceError)
TLS_CLOSE_TIMEOUT = 5.0  # seconds to send a TLS close_notify before closing anyway


class NBDServer:
    def __init__(self, registry: ExportRegistry) -> None:
        self._registry = registry
        self._counters: Counter[str] = Counter(
            connections_open=0, connections_total=0, requests_served=0, request_errors=0
        )
        self._live: dict[int, tuple[Handshake, trio.CancelScope, trio.Event]] = {}

    def writers_of(self, volume: str) -> int:
        """Connections that have volume `volume` itself (read-write) open."""
        return sum(1 for hs, _, _ in self._live.values() if _writes(hs, volume))

    async def disconnect_writers(self, volume: str) -> int:
        """End the connections that have `volume` open read-write (their requests in
        worker threads finish first); returns once their exports are released."""
        ending = [(scope, done) for hs, scope, done in self._live.values() if _writes(hs, volume)]
        for scope, _ in ending:
            scope.cancel()
        for _, done in ending:
            await done.wait()
        if ending:
            log.warning("nbd: disconnected %d client(s) of %s", len(ending), volume)
        return len(ending)

    def statistics(self) -> dict[str, int]:
        """connections_open, connections_total, requests_served, request_errors."""
        return dict(self._counters)

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Remove a stale socket file, bind, chmod 0600, task_status.started(), serve until
        cancelled; the socket file is removed on the way out. A socket file someone still
        listens on raises `Locked`; any other file there, `InvalidArgument`."""
        path = os.fspath(path)
        listener, identity = await _open_unix_listener(path)
        try:
            await self._serve([listener], task_status)
        finally:
            remove_if_same(path, identity)

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on every address `host` resolves to, `task_status.started(socknames)`,
        serve until cancelled. Without `tls` only loopback addresses are accepted
        (InvalidArgument otherwise); with it every client must start TLS."""
        await trio.to_thread.run_sync(partial(check_listen_address, host, port, tls=bool(tls)))
        listeners = await trio.open_tcp_listeners(port, host=host)
        addresses = [listener.socket.getsockname() for listener in listeners]
        log.info("nbd: listening on TCP %s%s", addresses, " (TLS required)" if tls else "")
        await self._serve(listeners, task_status, addresses, tls=tls)

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[Any],
        started: Any = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        handler = partial(self.handle_stream, tls=tls)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handler, listeners)
            task_status.started(started)

    async def handle_stream(
        self, stream: trio.abc.Stream, *, tls: ssl.SSLContext | None = None
    ) -> None:
        """Serve one connection to its end (TLS required when `tls` is given). Never
        raises, except trio.Cancelled."""
        self._counters["connections_open"] += 1
        self._counters["connections_total"] += 1
        wire = Wire(stream, self._counters["connections_total"])
        handshake = Handshake(wire, self._registry, tls)
        scope, done = trio.CancelScope(), trio.Event()
        self._live[wire.ident] = (handshake, scope, done)
        try:
            with scope:
                await self._converse(wire, handshake)
        finally:
            try:
                with trio.CancelScope(shield=scope.cancel_called):
                    await self._end(wire, handshake.device)
            finally:
                del self._live[wire.ident]
                done.set()

    async def _converse(self, wire: Wire, handshake: Handshake) -> None:
        try:
            device = await handshake.run()
            if device is not None:
                session = handshake.session
                await Transmission(wire, device, session, self._counters).run()
        except PeerClosed as exc:
            level = logging.DEBUG if exc.clean else logging.INFO
            log.log(level, "nbd conn %d: client left in %s", wire.ident, handshake.state.value)
        except _CONNECTION_ENDS as exc:
            log.info("nbd conn %d: closed in %s: %r", wire.ident, handshake.state.value, exc)
        except Exception:
            log.exception("nbd conn %d: failed in %s", wire.ident, handshake.state.value)

    async def _end(self, wire: Wire, device: BlockDevice | None) -> None:
        """Close the export, then the stream: a client that sees end of stream knows its
        export is released."""
        if device is not None:
            await release_export(device)
        self._counters["connections_open"] -= 1
        if wire.tls:  # send close_notify, as the spec asks, but never wait long
            deadline = trio.current_time() + TLS_CLOSE_TIMEOUT
            with (
                trio.CancelScope(shield=True, deadline=deadline),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await wire.stream.aclose()
        await trio.aclose_forcefully(wire.stream)
        log.debug("nbd conn %d: closed", wire.ident)


def _writes(handshake: Handshake, volume: str) -> bool:
    device = handshake.device
    return device is not None and device.name == volume and not device.readonly


# Listeners.


async def _open_unix_listener(path: str) -> tuple[trio.SocketListener, tuple[int, int]]:
    """Bind, then chmod, then listen: nobody can connect before the mode is 0600.
    Returns the listener and the identity of its socket file."""
    await remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)
        identity = socket_identity(path)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock), identity
