"""A volume's origin: the file or block device whose live contents shadowblk serves.

An origin is opened once by the engine and locked for as long as it is open: an OFD lock
on a regular file, O_EXCL on a block device (the kernel refuses a second exclusive open and
any mount of it). Writes that bypass shadowblk would corrupt snapshots: the lock keeps other
shadowblk services out; the README warns everyone else.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from . import faults
from .errors import InvalidArgument, Locked
from .fileio import (
    data_extents,
    device_size,
    fsync_dir,
    ofd_lock,
    pread_full,
    preadv_full,
    pwrite_full,
    start_writeback,
    zero_block_range,
    zero_file_range,
)


class Origin:
    """An open, locked origin."""

    def __init__(self, path: Path, fd: int, kind: str, size: int) -> None:
        self.path = path
        self.fd = fd
        self.kind = kind
        self.size = size
        self.dirty = False  # written since the last start_writeback
        self.on_dirty: Callable[[], None] | None = None  # told when `dirty` becomes true

    @classmethod
    def open(cls, path: Path) -> Origin:
        """Open and lock an existing origin file or block device."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InvalidArgument(f"origin {path} does not exist") from None
        if stat.S_ISBLK(st.st_mode):
            return cls._open_block(path)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"origin {path} is neither a regular file nor a block device")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            ofd_lock(fd, f"origin {path}")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, "file", device_size(fd))

    @classmethod
    def _open_block(cls, path: Path) -> Origin:
        try:
            fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise Locked(
                    f"block device {path} is in use (mounted or opened exclusively)"
                ) from e
            raise
        return cls(path, fd, "block", device_size(fd))

    @classmethod
    def create(cls, path: Path, size: int, sparse: bool) -> Origin:
        """Create a new origin file of `size` bytes, fully allocated unless `sparse`."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            ofd_lock(fd, f"origin {path}")
            os.ftruncate(fd, size)
            if not sparse:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
            fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd, "file", size)

    def identity(self) -> tuple[int, int]:
        """(device, inode) or, for a block device, (rdev, 0): what two volumes must not share."""
        st = os.fstat(self.fd)
        if stat.S_ISBLK(st.st_mode):
            return (st.st_rdev, 0)
        return (st.st_dev, st.st_ino)

    def pread(self, offset: int, length: int) -> bytes:
        faults.hit("origin.read")
        return pread_full(self.fd, length, offset)

    def pread_into(self, offset: int, view: memoryview) -> None:
        preadv_full(self.fd, view, offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        faults.hit("origin.pwrite")
        pwrite_full(self.fd, data, offset)
        if not self.dirty:
            self.dirty = True
            if self.on_dirty is not None:
                self.on_dirty()

    def start_writeback(self) -> None:
        """If written since the last call, start writing the dirty pages back (see
        `engine.Writeback`)."""
        if self.dirty:
            self.dirty = False
            start_writeback(self.fd)

    def zero(self, offset: int, length: int, *, punch: bool) -> None:
        """Make a range read as zeroes: BLKZEROOUT on a block device (never a discard),
        a punched hole (`punch`) or an allocated zero range on a file."""
        if self.kind == "block":
            zero_block_range(self.fd, offset, length)
        else:
            zero_file_range(self.fd, offset, length, punch=punch)

    def extents(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """(start, length, is_data) runs: holes of a file read as zeroes; a block device is
        all data."""
        if self.kind == "block":
            return [(offset, end - offset, True)]
        return data_extents(self.fd, offset, end)

    def advise_willneed(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
