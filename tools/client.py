"""A blocking client of the control socket, for the CLI and for scripts.

    with ControlClient.connect(state_dir) as client:
        snaps = client.call("snapshot.list", volume="vol0")

`call` returns the reply's result or raises the `ShadowblkError` subclass of the reply's
error code (a plain `ShadowblkError` carrying the code when this client does not know it).
`ServiceUnavailable` (exit code 3) means nobody answers on the state directory: no socket,
or a stale one.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from shadowblk.provider.errors import ServiceUnavailable, ShadowblkError

from . import protocol

CONTROL_SOCKET = "control.sock"
NBD_SOCKET = "nbd.sock"
_NO_SERVICE = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)


def _error_classes() -> dict[str, type[ShadowblkError]]:
    """code -> the most general ShadowblkError subclass with that code."""
    table: dict[str, type[ShadowblkError]] = {}
    pending: list[type[ShadowblkError]] = [ShadowblkError]
    while pending:
        cls = pending.pop(0)
        table.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return table


ERROR_CLASSES = _error_classes()


def error_from_reply(error: dict[str, Any]) -> ShadowblkError:
    code = str(error.get("code", "internal"))
    message = str(error.get("message", ""))
    cls = ERROR_CLASSES.get(code)
    if cls is not None:
        return cls(message)
    exc = ShadowblkError(message)
    exc.code = code
    return exc


class ProtocolError(ShadowblkError):
    """The service answered something this client cannot read."""

    code = "protocol"


class NoAnswer(ShadowblkError):
    """The service accepted the connection but did not answer in time."""

    code = "no-answer"


class ControlClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(
        cls, state_dir: str | os.PathLike[str], *, timeout: float | None = None
    ) -> ControlClient:
        """Connect to the service of `state_dir`; `timeout` bounds every later wait too."""
        path = Path(state_dir) / CONTROL_SOCKET
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise NoAnswer(f"the service did not accept a connection on {path}") from None
            if exc.errno in _NO_SERVICE:
                raise ServiceUnavailable(
                    f"no shadowblk service runs on {state_dir} (nobody answers on {path}); "
                    f"start one with: shadowblk --state-dir {state_dir} serve"
                ) from None
            raise ShadowblkError(f"cannot connect to {path}: {exc.strerror}") from None
        return cls(sock)

    def call(
        self, op: str, *, on_event: Callable[[dict[str, Any]], None] | None = None, **args: Any
    ) -> Any:
        """Send one request and wait for its reply. Events that arrive meanwhile go to
        `on_event`, or are kept in `events`."""
        rid = next(self._ids)
        try:
            return self._call(rid, op, args, on_event)
        except TimeoutError:
            raise NoAnswer(
                f"the service did not answer {op} within {self._sock.gettimeout()} s"
            ) from None

    def _call(
        self,
        rid: int,
        op: str,
        args: dict[str, Any],
        on_event: Callable[[dict[str, Any]], None] | None,
    ) -> Any:
        self._sock.sendall(protocol.encode({"id": rid, "op": op, "args": args}))
        while True:
            message = self._receive()
            if "event" in message:
                if on_event is not None:
                    on_event(message)
                else:
                    self.events.append(message)
                continue
            if message.get("id") != rid:
                raise ProtocolError(f"reply for request {message.get('id')!r}, expected {rid}")
            if message.get("ok") is True:
                return message.get("result")
            raise error_from_reply(message.get("error") or {})

    def _receive(self) -> dict[str, Any]:
        line = self._file.readline(protocol.MAX_LINE * 64)
        if not line.endswith(b"\n"):
            raise ServiceUnavailable("the service closed the control connection")
        try:
            message = protocol.decode_line(line)
        except ShadowblkError:
            raise ProtocolError("the service sent a line that is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolError("the service sent something that is not a JSON object")
        return message

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
