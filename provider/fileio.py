"""Low-level file I/O: loops on short reads and writes, hole punching, zeroing, locks, fsync.

Everything here is a thin, blocking wrapper over one system call (or a loop of them); the
policy of when to call them lives in the engine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from .errors import Locked

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Read exactly `length` bytes (zeroes past end of file, as a disk would)."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            parts.append(bytes(length - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def preadv_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `offset` (zeroes past end of file, as a disk would): no copy."""
    while view:
        n = os.preadv(fd, [view], offset)
        if not n:
            view[:] = bytes(len(view))
            return
        view = view[n:]
        offset += n


SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages back (sync_file_range WRITE: no wait, no
    durability promise; a later fdatasync has less to do). Advisory: errors are ignored,
    fdatasync reports them."""
    _libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of `data`, looping on short writes."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate({what}) failed: {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a regular file, keeping its size."""
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "PUNCH_HOLE")


def zero_file_range(fd: int, offset: int, length: int, *, punch: bool) -> None:
    """Make a range of a regular file read as zeroes: deallocated if `punch`, else still
    allocated (so a later write cannot fail for want of space). Falls back to writing
    zeroes where the filesystem cannot."""
    try:
        if punch:
            punch_hole(fd, offset, length)
        else:
            _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, "ZERO_RANGE")
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    step = 1 << 20
    for pos in range(offset, offset + length, step):
        pwrite_full(fd, bytes(min(step, offset + length - pos)), pos)


def data_extents(
    fd: int, offset: int, end: int, max_runs: int = 16384
) -> list[tuple[int, int, bool]]:
    """Runs of a regular file from `offset` as (start, length, is_data), from
    SEEK_DATA/SEEK_HOLE (a filesystem without them reports everything as data); they
    cover [offset, end), or a prefix of it once `max_runs` runs are found."""
    runs: list[tuple[int, int, bool]] = []
    pos = offset
    while pos < end and len(runs) < max_runs:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                return runs + [(pos, end - pos, True)]
            data = end
        if data > pos:
            runs.append((pos, min(data, end) - pos, False))
            pos = min(data, end)
            continue
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        runs.append((pos, hole - pos, True))
        pos = hole
    return runs


def is_hole(fd: int, offset: int, length: int) -> bool:
    """Is [offset, offset+length) of a regular file a hole? One SEEK_DATA (which sees
    data still in the page cache); a filesystem without it says no."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        return e.errno == errno.ENXIO  # no data after offset


def zero_block_range(fd: int, offset: int, length: int) -> None:
    """Zero a range of a block device with BLKZEROOUT (never BLKDISCARD)."""
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))


def device_size(fd: int) -> int:
    """The size in bytes of an open file or block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])
    return st.st_size


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (after creating or removing a file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ofd_lock(fd: int, what: str) -> None:
    """Take an exclusive OFD lock on a whole file, or raise `Locked`.

    OFD locks belong to the open file description: a second open of the same file conflicts
    even inside the same process, which is what catches two volumes adopting one origin.
    """
    flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise Locked(f"{what} is in use by another process or volume") from e
        raise


def flock_exclusive(path: Path, what: str) -> int:
    """Open (creating) `path` and hold an exclusive flock on it; returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder else ""
            raise Locked(f"{what} is in use by another shadowblk service{who}") from e
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
