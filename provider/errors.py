"""Typed errors of shadowblk.

Every error the engine raises is a `ShadowblkError` subclass carrying three things the edges
need: a stable `code` (the control socket's error code), an `errno` (what NBD and FUSE
answer) and a message a person can act on. Adapters never invent codes of their own: they
map these.
"""

from __future__ import annotations

import errno as _errno


class ShadowblkError(Exception):
    """Base class: `code` for the control socket, `errno` for NBD/FUSE, `exit_code` for the CLI."""

    code = "internal"
    errno = _errno.EIO
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class NotFound(ShadowblkError):
    code = "not-found"
    errno = _errno.ENOENT


class AlreadyExists(ShadowblkError):
    code = "already-exists"
    errno = _errno.EEXIST


class Busy(ShadowblkError):
    code = "busy"
    errno = _errno.EBUSY


class InvalidArgument(ShadowblkError):
    code = "invalid-argument"
    errno = _errno.EINVAL


class OutOfRange(InvalidArgument):
    """An offset or length beyond the end of a device."""


class NotSupported(ShadowblkError):
    """The request cannot be done the way asked (e.g. a fast zero that must preserve)."""

    code = "not-supported"
    errno = _errno.EOPNOTSUPP


class ReadOnly(ShadowblkError):
    code = "read-only"
    errno = _errno.EPERM


class InsufficientStorage(ShadowblkError):
    code = "insufficient-storage"
    errno = _errno.ENOSPC


class MaxSnapshots(ShadowblkError):
    code = "max-snapshots"
    errno = _errno.ENOSPC


class HoldTimeout(ShadowblkError):
    code = "hold-timeout"
    errno = _errno.ETIMEDOUT


class Locked(ShadowblkError):
    """A state directory or an origin is already in use by someone else."""

    code = "locked"
    errno = _errno.EBUSY


class FormatError(ShadowblkError):
    """On-disk metadata we cannot use: unknown newer version, wrong marker, corruption."""

    code = "format"
    errno = _errno.EIO


class DamagedData(ShadowblkError):
    """A diff-area chunk failed its checksum or could not be read: EIO, never wrong bytes."""

    code = "damaged"
    errno = _errno.EIO


class InvalidState(ShadowblkError):
    """The object exists but its lifecycle state does not permit the operation."""

    code = "invalid-state"
    errno = _errno.EIO


class StorageFailure(ShadowblkError):
    """An origin or a diff area failed an I/O the operation needed (the OSError's message;
    the control socket answers an engine's OSError with this code)."""

    code = "io-error"
    errno = _errno.EIO


class ServiceUnavailable(ShadowblkError):
    """No service answers on the state directory's control socket."""

    code = "no-service"
    errno = _errno.ECONNREFUSED
    exit_code = 3
