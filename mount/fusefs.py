"""The FUSE front-end: one file per export, at `<state>/fuse` (pyfuse3, inside `serve`).

Files, all in the root directory:
- `VOLUME`: the origin, read-write (0644). Writes go through the engine (copy-on-write);
  `direct_io`, so the kernel caches nothing and the file stays coherent with NBD writes.
- `VOLUME@N`: a snapshot, read-only (0444; opening it for writing is EROFS). `keep_cache`:
  its bytes never change, so the kernel's page cache stays valid across opens.
- `.VOLUME@N.recover-K`: a recovery overlay (overlay.py), read-write, made by
  `shadowblk mount` and dropped when its last opener (the loop device) lets go.

Sizes are exact; files appear and disappear with volumes and snapshots (no entry or
attribute caching: every lookup asks the engine). fsync is an engine flush, so a
filesystem on a loop device over `VOLUME` keeps its durability promises.

Never block here: pyfuse3 runs every handler in the service's one trio thread, next to the
NBD server. Fast engine calls run inline (reads, `write_nowait`); anything that may wait
(a write held by a snapshot creation, a flush) runs in a worker thread.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from shadowblk.provider.api import BlockDevice, EngineAPI
from shadowblk.provider.errors import NotFound, ShadowblkError

from .overlay import RecoveryOverlay

log = logging.getLogger("shadowblk.fuse")
T = TypeVar("T")
OVERLAY_PREFIX = "."
OVERLAY_MARK = ".recover-"


@dataclass
class _Overlay:
    device: RecoveryOverlay
    opens: int = 0


class ShadowFS(pyfuse3.Operations):
    def __init__(self, engine: EngineAPI, store_dir: Path) -> None:
        super().__init__()
        self.engine = engine
        self.store_dir = store_dir
        self._inodes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._next_inode = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._handles: dict[int, tuple[str, Any]] = {}  # fh -> (name, device)
        self._next_fh = itertools.count(1)
        self._overlays: dict[str, _Overlay] = {}
        self._overlay_seq = itertools.count(1)
        self._started = time.time_ns()

    # --- recovery overlays (called by the control ops) ----------------------------------

    def create_overlay(self, snapshot: str) -> str:
        """A new recovery overlay over `snapshot`; its file name in the FUSE directory."""
        if "@" not in snapshot:
            raise NotFound(f"{snapshot} is not a snapshot (VOLUME@N)")
        base = self.engine.open_export(snapshot)
        name = f"{OVERLAY_PREFIX}{snapshot}{OVERLAY_MARK}{next(self._overlay_seq)}"
        try:
            self._overlays[name] = _Overlay(RecoveryOverlay(name, base, self.store_dir))
        except BaseException:
            base.close()
            raise
        log.info("recovery overlay %s created", name)
        return name

    def drop_overlay(self, name: str) -> bool:
        """Drop an overlay nobody has open; False if it is open (it goes at its release)."""
        entry = self._overlays.get(name)
        if entry is None:
            return True
        if entry.opens:
            return False  # dropped at its last release
        del self._overlays[name]
        entry.device.close()
        log.info("recovery overlay %s dropped", name)
        return True

    def opens_of(self, name: str) -> int:
        """Open handles of file `name` (a loop device over it counts as one)."""
        return sum(1 for n, _ in self._handles.values() if n == name)

    def close(self) -> None:
        for _, device in self._handles.values():
            if not isinstance(device, RecoveryOverlay):
                device.close()
        self._handles.clear()
        for entry in self._overlays.values():
            entry.device.close()
        self._overlays.clear()

    # --- names and attributes -----------------------------------------------------------

    def _entries(self) -> dict[str, tuple[int, bool]]:
        """name -> (size, read-only), as of now."""
        sizes = {v.name: v.size for v in self.engine.volumes()}
        entries: dict[str, tuple[int, bool]] = {}
        for name, _ in self.engine.export_names():
            volume = name.partition("@")[0]
            if volume in sizes:
                entries[name] = (sizes[volume], "@" in name)
        for name, entry in self._overlays.items():
            entries[name] = (entry.device.size, False)
        return entries

    def _inode(self, name: str) -> int:
        inode = self._inodes.get(name)
        if inode is None:
            inode = self._inodes[name] = next(self._next_inode)
            self._names[inode] = name
        return inode

    def _attr(self, inode: int, size: int = 0, readonly: bool = True) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | (0o444 if readonly else 0o644)
            attr.st_nlink = 1
            attr.st_size = size
            attr.st_blocks = -(-size // 512)
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._started
        attr.st_uid, attr.st_gid = os.getuid(), os.getgid()
        attr.attr_timeout = 0
        attr.entry_timeout = 0
        return attr

    def _file_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        name = self._names.get(inode)
        entry = self._entries().get(name) if name is not None else None
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode, *entry)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attr(pyfuse3.ROOT_INODE)
        entry = self._entries().get(os.fsdecode(name))
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self._inode(os.fsdecode(name)), *entry)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        if inode == pyfuse3.ROOT_INODE:
            return self._attr(inode)
        return self._file_attr(inode)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        current = await self.getattr(inode)
        if fields.update_size and attr.st_size != current.st_size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a volume's size is fixed
        return current

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = sorted(self._entries().items())
        for index, (name, (size, readonly)) in enumerate(entries[start_id:], start_id + 1):
            attr = self._attr(self._inode(name), size, readonly)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, index):
                return

    async def statfs(self, ctx: Any) -> Any:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # --- files --------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        name = self._names.get(inode)
        if name is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        overlay = self._overlays.get(name)
        if overlay is not None:
            overlay.opens += 1
            device: Any = overlay.device  # the file-serving subset of BlockDevice
        else:
            device = _call(self.engine.open_export, name)
            if writing and device.readonly:
                device.close()
                raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._next_fh)
        self._handles[fh] = (name, device)
        if overlay is not None:
            return pyfuse3.FileInfo(fh=fh)
        return pyfuse3.FileInfo(fh=fh, direct_io=not device.readonly, keep_cache=device.readonly)

    def _device(self, fh: int) -> BlockDevice:
        try:
            return self._handles[fh][1]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    async def read(self, fh: int, off: int, size: int) -> bytes:
        device = self._device(fh)
        size = max(0, min(size, device.size - off))
        if not size:
            return b""
        data = _call(device.pread, off, size)
        return data if isinstance(data, bytes) else bytes(data)  # pyfuse3 wants bytes

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        device = self._device(fh)
        if device.readonly:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off + len(buf) > device.size:
            raise pyfuse3.FUSEError(errno.ENOSPC if off < device.size else errno.EFBIG)
        if not _call(device.write_nowait, off, buf):
            await _in_thread(device.write, off, buf)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await _in_thread(self._device(fh).flush)

    async def flush(self, fh: int) -> None:
        """close(2): nothing to do (durability is fsync's, as on a disk)."""

    async def release(self, fh: int) -> None:
        name, device = self._handles.pop(fh, ("", None))
        overlay = self._overlays.get(name)
        if overlay is not None:
            overlay.opens -= 1
            if overlay.opens == 0:
                self.drop_overlay(name)
        elif device is not None:
            device.close()


def _call(fn: Callable[..., T], *args: Any) -> T:
    """An inline engine call; its errors become the FUSE errno."""
    try:
        return fn(*args)
    except (ShadowblkError, OSError) as exc:
        raise _fuse_error(exc) from None


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """An engine call that may block, in a worker thread; its errors become the errno."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except (ShadowblkError, OSError) as exc:
        raise _fuse_error(exc) from None


def _fuse_error(exc: ShadowblkError | OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno or errno.EIO)
