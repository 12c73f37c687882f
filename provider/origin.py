"""A volume's origin: the file or block device whose live contents shadowblk serves.

An origin is opened once by the engine and locked for as long as it is open: an OFD lock
on a regular file, O_EXCL on a block device (the kernel refuses a second exclusive open and
any mount of it). Writes that bypass shadowblk would corrupt snapshots: the lock keeps other
shadowblk services out; the README warns everyone else.

Durability goes through the volume's journal (provider/journal.py) once one is attached:
every write of the origin is also appended there, under one lock so a block's records are
in the order its writes happened, and `sync` is then an fdatasync of the journal. A write
the journal does not take makes the next `sync` a `checkpoint`: an fdatasync of the origin
itself, after which the journal's start moves past everything it covered.

Overlay writes (a chunk whose preserve is not yet durable, provider/cow.py) are journaled
too, without touching the origin (`log_overlay`); the first record of each preserve is
pinned until its overlay is on the origin. A checkpoint cuts the journal at its head once
every record pinned before the cut is unpinned: a partial cut could leave older records
to be replayed over a write the journal did not take, undoing it. An overlay whose
write-back failed stays pinned (`stall`: the journal is then the only durable copy of its
writes) while the preserver retries it; a checkpoint that finds such a pin before its cut
raises `OverlayStuck` at once instead of waiting, and cuts nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import faults
from .errors import InvalidArgument, Locked
from .fileio import (
    data_extents,
    device_size,
    fsync_dir,
    is_hole,
    ofd_lock,
    pread_full,
    preadv_full,
    pwrite_full,
    start_writeback,
    zero_block_range,
    zero_file_range,
)
from .journal import DATA, PUNCH, ZERO, Journal, Prepare, Record

log = logging.getLogger(__name__)

PIN_WAIT = 0.05  # seconds a background checkpoint waits for pinned overlays, at most


class CheckpointWait(Exception):
    """A checkpoint's deadline passed while it waited (for pinned overlays, or for another
    checkpoint): nothing was synced. Not an OSError: an fdatasync's ETIMEDOUT is an I/O
    error and stays one."""


class OverlayStuck(OSError):
    """A checkpoint found an overlay whose write-back to the origin failed (it is retried):
    its writes are durable only in the journal, so the journal cannot be cut before it."""

    def __init__(self, path: Path, error: OSError | None) -> None:
        super().__init__(
            errno.EIO,
            f"origin {path}: an acknowledged write could not be written back to it "
            f"({error}); the journal keeps it while the write-back is retried",
        )


def _remaining(deadline: float | None) -> float | None:
    """Seconds to `deadline` (monotonic), at least 0; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Origin:
    """An open, locked origin."""

    def __init__(self, path: Path, fd: int, kind: str, size: int) -> None:
        self.path = path
        self.fd = fd
        self.kind = kind
        self.size = size
        self.dirty = False  # written since the last start_writeback
        self.on_dirty: Callable[[], None] | None = None  # told when `dirty` becomes true
        self.journal: Journal | None = None
        self._jlock = threading.Lock()  # an origin write and its record, in one order
        self._unpinned = threading.Condition(self._jlock)  # a pin went (checkpoints wait)
        # log positions of pinned records, oldest first: None, or the error of its failed
        # write-back (`stall`)
        self._pins: dict[int, OSError | None] = {}
        self._ckpt_lock = threading.Lock()  # one checkpoint at a time
        self._unlogged = 0  # writes the journal did not take
        self._covered = 0  # how many of those a completed checkpoint made durable
        self.checkpointed = time.monotonic()  # when the last checkpoint ended
        self._error: OSError | None = None  # a background checkpoint's, for the next sync
        self.closed = False
        self._append_failing = False

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

    def is_hole(self, offset: int, length: int) -> bool:
        """Does the range read as zeroes without being allocated? (never on a device)"""
        return self.kind == "file" and is_hole(self.fd, offset, length)

    def pread_into(self, offset: int, view: memoryview) -> None:
        preadv_full(self.fd, view, offset)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, log: bool = True) -> None:
        """Write, and journal the write (`log` False: its bytes are in pinned overlay
        records already, an overlay's write-back)."""
        faults.hit("origin.pwrite")
        with self._jlock:
            pwrite_full(self.fd, data, offset)
            if log:
                self._log(DATA, offset, len(data), data)
        self._dirtied()

    def log_overlay(
        self,
        kind: int,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None,
        epoch: int,
        pin: bool,
    ) -> int | None:
        """Journal an overlay write of `epoch`'s preserve (the origin is not written);
        `pin`: keep it from checkpoints until `unpin`. Its log position, or None if the
        journal did not take it (the caller then drains that preserve before a sync)."""
        with self._jlock:
            if self.journal is None:
                return None
            try:
                lsn = self.journal.append(kind, offset, length, data, epoch)
            except OSError as e:  # that preserve is drained before the next sync instead
                if not self._append_failing:  # once per run of failures, not per write
                    log.error("origin %s: journal append failed (%s): syncs wait for the "
                              "preserves until it works again", self.path, e)  # fmt: skip
                self._append_failing = True
                return None
            self._append_failing = False
            if lsn is not None and pin:
                self._pins[lsn] = None
            return lsn

    def unpin(self, lsn: int) -> None:
        """The overlay whose first record is at `lsn` is on the origin."""
        with self._jlock:
            del self._pins[lsn]
            self._unpinned.notify_all()

    def stall(self, lsn: int, error: OSError) -> None:
        """The write-back of the overlay pinned at `lsn` failed: it stays pinned, and a
        checkpoint stops at it (OverlayStuck) until `unpin`."""
        with self._jlock:
            self._pins[lsn] = error
            self._unpinned.notify_all()

    def _dirtied(self) -> None:
        if not self.dirty:
            self.dirty = True
            if self.on_dirty is not None:
                self.on_dirty()

    def start_writeback(self) -> None:
        """If written since the last call, start writing the dirty pages back (see
        `engine.Writeback`)."""
        if self.dirty and not self.closed:
            self.dirty = False
            start_writeback(self.fd)

    def zero(self, offset: int, length: int, *, punch: bool, log: bool = True) -> None:
        """Make a range read as zeroes: BLKZEROOUT on a block device (never a discard),
        a punched hole (`punch`) or an allocated zero range on a file. `log` as `pwrite`."""
        with self._jlock:
            self._zero(offset, length, punch)
            if log:
                self._log(PUNCH if punch else ZERO, offset, length, None)
        self._dirtied()

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        if self.kind == "block":
            zero_block_range(self.fd, offset, length)
        else:
            zero_file_range(self.fd, offset, length, punch=punch)

    def _log(
        self, kind: int, offset: int, length: int, data: bytes | bytearray | memoryview | None
    ) -> None:
        """Append the record of a write just made (`_jlock` held); count it as unlogged
        if the journal does not take it."""
        if self.journal is not None:
            try:
                if self.journal.append(kind, offset, length, data) is not None:
                    self._append_failing = False
                    return
            except OSError as e:  # the origin has the write: the next sync checkpoints
                if not self._append_failing:  # once per run of failures, not per write
                    log.error("origin %s: journal append failed (%s): syncs checkpoint "
                              "until it works again", self.path, e)  # fmt: skip
                self._append_failing = True
        self._unlogged += 1

    def extents(self, offset: int, end: int) -> list[tuple[int, int, bool]]:
        """(start, length, is_data) runs: holes of a file read as zeroes; a block device is
        all data."""
        if self.kind == "block":
            return [(offset, end - offset, True)]
        return data_extents(self.fd, offset, end)

    def advise_willneed(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def attach_journal(
        self, path: Path, volume_uuid: str, prepare: Prepare | None = None
    ) -> tuple[int, int]:
        """Open (or create) the journal at `path`, replay it onto the origin (`prepare`
        sees every record first: the engine preserves what overlay records would
        overwrite), make the origin durable, start the journal's next generation and log
        every later write there. Before anything else reads the origin. Returns (records,
        bytes) replayed."""
        if path.exists():
            journal = Journal.open(path, volume_uuid)
        else:
            journal = Journal.create(path, volume_uuid, self.size)
        try:
            replayed = journal.replay(self._apply, self.size, prepare)
            os.fdatasync(self.fd)
            journal.restart()
        except BaseException:
            journal.close()
            raise
        self.journal = journal
        return replayed

    def _apply(self, record: Record) -> None:
        if record.kind == DATA:
            assert record.data is not None
            pwrite_full(self.fd, record.data, record.offset)
        else:
            self._zero(record.offset, record.length, record.kind == PUNCH)

    def sync(self, deadline: float | None = None) -> None:
        """Every write made before this call is durable on return: an fdatasync of the
        journal, or a checkpoint if a write bypassed it. A background checkpoint's failure
        is raised here, once, as a disk reports a failed writeback. `deadline` (monotonic)
        bounds a checkpoint's wait for pinned overlays (CheckpointWait)."""
        error, self._error = self._error, None
        if error is not None:
            raise error
        with self._jlock:
            journal = None if self._unlogged > self._covered else self.journal
        if journal is None:
            self.checkpoint(deadline)
        else:
            journal.sync()

    def needs_checkpoint(self) -> bool:
        """Will the next `sync` be a checkpoint? (a write bypassed the journal)"""
        return self._unlogged > self._covered or self.journal is None

    def checkpoint(self, deadline: float | None = None) -> None:
        """Make the origin itself durable, then move the journal's start past every record
        that sync covered (so a replay never undoes a write the journal did not take).
        Waits first until no record before the cut is pinned (its overlay is not on the
        origin yet); `deadline` bounds that wait and the one for another checkpoint
        (CheckpointWait). A pinned overlay whose write-back failed is not waited for:
        OverlayStuck, nothing synced."""
        wait = _remaining(deadline)
        if not self._ckpt_lock.acquire(timeout=-1 if wait is None else wait):
            raise CheckpointWait("another checkpoint of the origin is still running")
        try:
            if self.closed:  # the writeback thread may still hold a removed volume's origin
                return
            with self._jlock:
                cut = self.journal.head if self.journal is not None else 0
                while self._pins and (first := next(iter(self._pins))) < cut:
                    if self._pins[first] is not None:
                        raise OverlayStuck(self.path, self._pins[first])
                    if not self._unpinned.wait(_remaining(deadline)):
                        raise CheckpointWait("pinned overlay records did not reach the origin")
                unlogged = self._unlogged
            try:
                faults.hit("checkpoint.sync")
                os.fdatasync(self.fd)
                if self.journal is not None and cut != self.journal.start:
                    faults.hit("checkpoint.advance")
                    self.journal.advance(cut)
            finally:
                self.checkpointed = time.monotonic()
            self._covered = max(self._covered, unlogged)
        finally:
            self._ckpt_lock.release()

    def sync_uncut(self) -> None:
        """Make the origin and its journal durable without cutting the journal (a closing
        engine whose checkpoint an overlay's failed write-back stops: OverlayStuck)."""
        os.fdatasync(self.fd)
        if self.journal is not None:
            self.journal.sync()

    def background_checkpoint(self, age: float) -> None:
        """A checkpoint, if one is due: the journal is a quarter full, or it (or a write it
        did not take) has waited `age` seconds since the last. A failure waits for the next
        `sync` to report it (the records stay in the journal meanwhile)."""
        journal = self.journal
        full = journal is not None and journal.used() * 4 >= journal.capacity
        due = full or time.monotonic() - self.checkpointed >= age
        if not due or self._error is not None or not self.checkpoint_waiting():
            return
        try:
            self.checkpoint(time.monotonic() + PIN_WAIT)
        except (CheckpointWait, OverlayStuck):  # overlays not on the origin yet: next time
            pass
        except OSError as e:
            log.error("origin %s: checkpoint failed: %s", self.path, e)
            self._error = e

    def checkpoint_waiting(self) -> bool:
        """Some write is durable only through the journal, or not yet at all."""
        journal = self.journal
        return self._unlogged > self._covered or (journal is not None and journal.used() > 0)

    def close(self) -> None:
        """Close (the engine checkpoints first when it closes cleanly, so an origin left
        for others is up to date and its journal empty)."""
        with self._ckpt_lock:
            self.closed = True
            os.close(self.fd)
            if self.journal is not None:
                self.journal.close()
