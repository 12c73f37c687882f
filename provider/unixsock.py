"""Unix-socket files of the service (NBD, control): replacing a stale one, removing our own.

A socket file left by a killed service is stale: nobody answers on it. It is replaced; a
socket somebody answers on, or a file that is not a socket, is refused (never unlinked).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

import trio

from .errors import InvalidArgument, Locked

log = logging.getLogger("shadowblk.unixsock")


async def remove_stale_socket(path: str | os.PathLike[str]) -> None:
    """Unlink a socket file nobody listens on; refuse a live one (`Locked`) or a non-socket."""
    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"{path} exists and is not a socket; move it away")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            await probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            log.info("removing stale socket %s", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
    raise Locked(f"{path}: another server is listening there")


def identity(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(device, inode) of the file at `path`: which socket file we bound."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def remove_if_same(path: str | os.PathLike[str], ident: tuple[int, int]) -> None:
    """Remove the socket file at `path` if it is still the one we bound."""
    with contextlib.suppress(OSError):
        if identity(path) == ident:
            os.unlink(path)
