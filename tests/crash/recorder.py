"""A recording block device, like dm-log-writes, as a FUSE file (run in its own process).

Design note

Usage: `python recorder.py BACKING MOUNTPOINT LOG`. The FUSE filesystem at MOUNTPOINT has
two files:
- `disk`: read-write, the size of BACKING, opened with `direct_io` (no page cache: every
  write the kernel makes reaches this process). Reads and writes go to BACKING; every write
  is also appended to the log, and every fsync of the file is a FLUSH marker in it. A loop
  device over `disk` turns the block layer's flushes (PREFLUSH, FUA) into fsync calls, so a
  filesystem on that loop device leaves, in the log, exactly the order and the durability
  points a real disk with a volatile write cache would have seen.
- `events`: read-only, the number of log records so far as a 20-digit decimal. A test
  reads it right after an operation returns: every record the operation made durable is
  below that number (the records of one request are appended before its reply).

The log is two files: `LOG.idx`, records of `RECORD` = (kind, offset, length) with kind
WRITE or FLUSH, and `LOG.dat`, the data of the WRITE records, concatenated in order.
close(2) on `disk` (FUSE flush) is no durability point and is not recorded.

Every handler is synchronous inside (no checkpoint between the pwrite and the append), so
the log order is the order in which this process answered. The process prints `ready`
once mounted, and exits 0 after its mountpoint is unmounted (or on SIGTERM/SIGINT).
Never mount anything from this process: a mount over its own FUSE file would deadlock it.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import struct
import sys
import time
from typing import Any

import pyfuse3
import trio

RECORD = struct.Struct("<BQQ")  # kind, offset, length
WRITE, FLUSH = 1, 2
DISK_INODE = pyfuse3.ROOT_INODE + 1
EVENTS_INODE = pyfuse3.ROOT_INODE + 2
EVENTS_WIDTH = 20
NAMES = {b"disk": DISK_INODE, b"events": EVENTS_INODE}


class RecordingFS(pyfuse3.Operations):
    """One disk file whose writes and fsyncs are logged, and the log's length."""

    def __init__(self, backing: str, log: str) -> None:
        super().__init__()
        self.fd = os.open(backing, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.idx = open(log + ".idx", "wb")  # noqa: SIM115 (closed in close())
        self.dat = open(log + ".dat", "wb")  # noqa: SIM115
        self.events = 0
        self.started = time.time_ns()

    def close(self) -> None:
        self.idx.close()
        self.dat.close()
        os.close(self.fd)

    def _append(self, kind: int, offset: int, data: bytes = b"") -> None:
        self.idx.write(RECORD.pack(kind, offset, len(data)))
        self.dat.write(data)
        self.events += 1

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            attr.st_mode, attr.st_nlink = stat.S_IFREG | 0o644, 1
            attr.st_size = self.size if inode == DISK_INODE else EVENTS_WIDTH
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.started
        attr.attr_timeout = attr.entry_timeout = 0
        return attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(NAMES[name])

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode not in (pyfuse3.ROOT_INODE, DISK_INODE, EVENTS_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if fields.update_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk's size is fixed
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(NAMES.items())
        for index, (name, inode) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), index):
                return

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode not in (DISK_INODE, EVENTS_INODE):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if inode == EVENTS_INODE and flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        if fh == EVENTS_INODE:
            return str(self.events).zfill(EVENTS_WIDTH).encode()[off : off + size]
        return os.pread(self.fd, max(0, min(size, self.size - off)), off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if fh != DISK_INODE:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        os.pwrite(self.fd, buf, off)
        self._append(WRITE, off, buf)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh == DISK_INODE:
            self._append(FLUSH, 0)

    async def flush(self, fh: int) -> None:
        """close(2): no durability point."""

    async def release(self, fh: int) -> None:
        """Nothing per handle."""


async def serve(fs: RecordingFS, mountpoint: str) -> None:
    options = set(pyfuse3.default_options) | {"fsname=sbkrecorder", "subtype=sbkrecorder"}
    options.discard("default_permissions")
    pyfuse3.init(fs, mountpoint, options)
    print("ready", flush=True)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: recorder.py BACKING MOUNTPOINT LOG", file=sys.stderr)
        return 2
    fs = RecordingFS(argv[1], argv[3])
    try:
        trio.run(serve, fs, argv[2])
    finally:
        fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
