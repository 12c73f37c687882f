"""The origin journal: small origin writes made durable by one sequential fdatasync.

Snapshot creation and FLUSH must make every acknowledged write of the origin durable. An
fdatasync of the origin costs what is dirty there, and under a random-write load that is
hundreds of scattered pages: on the disks here 1 to 6 ms at the median and 16 to 230 ms at
p99 (docs/benchmarks.md). So every small write the origin takes is also appended to this
journal, a ring in the volume's diff area, and making them durable is one fdatasync of the
journal's few sequential pages (about 0.5 ms). A checkpoint (the writeback thread, when the
journal is a quarter full or a second old) fdatasyncs the origin and then moves the
journal's start past what that sync covered. `open` replays the records after the start
onto the origin, in order, before anything reads it.

Writes the journal does not take (larger than MAX_DATA, or no room left until the next
checkpoint) go to the origin alone, and the next sync is then a checkpoint. Replaying a
record older than such a write could undo it, which is allowed only for a write no sync
covered: the checkpoint moves the start past every record before it, so it is.

Layout (docs/format.md has it byte by byte): two header slots (offsets 0 and 4096, written
alternately, the valid one with the higher sequence wins, so a torn header write loses
nothing), then a ring of `capacity` bytes. A record sits at log position `lsn` (ever
increasing), in the ring at lsn % capacity, never across its end (a WRAP record, or less
room than a record header, sends the reader to the next lap). A record is valid only with
its own lsn, the journal's generation (bumped at every open, so a record left over from an
earlier run is never replayed in a later one) and a checksum over header and data; the
first invalid one ends the replay.

Ordering: the caller (Origin) writes the origin and appends the record under one lock, so
the records of a block are in the order its writes reached the origin.

Overlay records (`epoch` set) carry a write acknowledged into a chunk's overlay, before
that chunk's preserve for `epoch` is durable (provider/cow.py): the origin does not have
their bytes yet. The first record of each such preserve is pinned (`Origin.log_overlay`)
until the overlay is on the origin, and a checkpoint never moves the start past a pinned
record; at open, before any record is applied, the engine preserves, for every overlay
record whose preserve never committed, the chunk as the records before it left it
(`replay` hands the records to `prepare` first).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from . import faults
from .errors import FormatError
from .fileio import fsync_dir, pread_full

log = logging.getLogger(__name__)

NAME = "journal"
MAGIC = b"SBJRNL01"
VERSION = 2  # 2: overlay records (an older shadowblk refuses the journal, never misreads it)
SLOT = 4096  # one header slot
RING = 2 * SLOT  # where the ring starts
CAPACITY = 32 * 1024 * 1024  # ring bytes, at most
MIN_CAPACITY = 1024 * 1024  # ring bytes, at least (a small volume gets 1/16 of its size)
MAX_DATA = 32 * 1024  # larger writes go to the origin alone (a whole 64 KiB chunk: sequential)

RECORD_MAGIC = 0x4C524253  # "SBRL"
DATA, ZERO, PUNCH, WRAP = 1, 2, 3, 4
OVERLAY = 1  # a record flag: an overlay write; its epoch (u64) follows the record header
_HEADER = struct.Struct("<8sIIQQQ16s")  # magic, version, generation, seq, start, capacity, uuid
_RECORD = struct.Struct("<IHHIIQQ")  # magic, kind, flags, generation, length, lsn, offset
_CHECK = struct.Struct("<Q")
_EPOCH = struct.Struct("<Q")
RECORD_HEADER = _RECORD.size + _CHECK.size  # 40


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _checksum(header: bytes, *parts: bytes | bytearray | memoryview | None) -> bytes:
    h = xxhash.xxh3_64(header)
    for part in parts:
        if part is not None:
            h.update(part)
    return _CHECK.pack(h.intdigest())


@dataclass(frozen=True)
class Record:
    kind: int
    offset: int
    length: int
    data: bytes | None
    epoch: int | None = None  # an overlay record's: the epoch of its chunk's preserve
    lsn: int = 0


Apply = Callable[[Record], None]
Prepare = Callable[[list[Record]], None]


class Journal:
    """One volume's origin journal, open. Not thread-safe: the owning Origin serializes
    `append` with its origin writes; `sync` may run concurrently with them."""

    def __init__(self, path: Path, fd: int, volume_uuid: bytes, capacity: int) -> None:
        self.path = path
        self.fd = fd
        self._uuid = volume_uuid
        self.capacity = capacity
        self.generation = 0
        self._seq = 0  # of the last header written
        self.start = 0  # log position of the first record a replay would apply (durable)
        self.head = 0  # where the next record goes

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, volume_uuid: str, volume_size: int) -> Journal:
        """A new, empty journal for a volume of `volume_size` bytes, durable on return:
        written under a temporary name, allocated, synced, renamed, the directory synced.
        Its ring is 1/16 of the volume, within [MIN_CAPACITY, CAPACITY]."""
        capacity = min(CAPACITY, max(MIN_CAPACITY, volume_size // 16 // SLOT * SLOT))
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, RING + capacity)
            except OSError:  # no fallocate here (or no room for it): a sparse ring works too
                os.ftruncate(fd, RING + capacity)
            journal = cls(path, fd, uuidlib.UUID(volume_uuid).bytes, capacity)
            journal.generation = 1
            journal._write_header(0)
            os.rename(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return journal

    @classmethod
    def open(cls, path: Path, volume_uuid: str) -> Journal:
        """An existing journal, its header read and checked (replay it next)."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            journal = cls(path, fd, uuidlib.UUID(volume_uuid).bytes, 0)
            journal._read_header()
        except BaseException:
            os.close(fd)
            raise
        return journal

    def _read_header(self) -> None:
        best = None
        for slot in (0, 1):
            raw = pread_full(self.fd, _HEADER.size + _CHECK.size, slot * SLOT)
            body, check = raw[: _HEADER.size], raw[_HEADER.size :]
            if _checksum(body) != check:
                continue
            magic, version, gen, seq, start, capacity, vid = _HEADER.unpack(body)
            if magic != MAGIC:
                continue
            if version > VERSION or version < 1:
                raise FormatError(f"journal {self.path} has version {version}: upgrade shadowblk")
            if best is None or seq > best[2]:
                best = (gen, start, seq, capacity, vid)
        if best is None:
            raise FormatError(f"journal {self.path} has no valid header: it is damaged")
        self.generation, self.start, self._seq, self.capacity, vid = best
        if vid != self._uuid:
            raise FormatError(f"journal {self.path} belongs to another volume")
        if self.capacity <= 0 or self.capacity % 8:
            raise FormatError(f"journal {self.path} has an invalid capacity {self.capacity}")
        self.head = self.start

    def _write_header(self, start: int) -> None:
        """Write the next header slot, with `start`, and fdatasync: it and the generation
        are durable on return."""
        self._seq += 1
        body = _HEADER.pack(
            MAGIC, VERSION, self.generation, self._seq, start, self.capacity, self._uuid
        )
        block = (body + _checksum(body)).ljust(SLOT, b"\0")
        os.pwrite(self.fd, block, (self._seq % 2) * SLOT)
        os.fdatasync(self.fd)

    def replay(self, apply: Apply, size: int, prepare: Prepare | None = None) -> tuple[int, int]:
        """Read every valid record from the start, hand them all to `prepare`, then apply
        them in order to an origin of `size` bytes; returns (records, bytes). The caller
        then makes the origin durable and calls `restart`. Idempotent: a crash midway
        replays the same records again."""
        found = self.records(size)
        if prepare is not None:
            prepare(found)
        for record in found:
            apply(record)
        return len(found), sum(r.length for r in found)

    def records(self, size: int) -> list[Record]:
        """The valid records from the start, in order (WRAP records left out), for an
        origin of `size` bytes; `head` is set after the last."""
        lsn, found = self.start, []
        while lsn - self.start < self.capacity:
            room = self.capacity - lsn % self.capacity
            if room < RECORD_HEADER:
                lsn += room
                continue
            record, size_of = self._read_record(lsn, size)
            if record is None:
                break
            if record.kind != WRAP:
                found.append(record)
            lsn += size_of
        self.head = lsn
        return found

    def _read_record(self, lsn: int, origin_size: int) -> tuple[Record | None, int]:
        phys = RING + lsn % self.capacity
        raw = pread_full(self.fd, RECORD_HEADER, phys)
        header, check = raw[: _RECORD.size], raw[_RECORD.size :]
        magic, kind, flags, gen, length, rec_lsn, offset = _RECORD.unpack(header)
        if magic != RECORD_MAGIC or gen != self.generation or rec_lsn != lsn:
            return None, 0
        if kind == WRAP:
            room = self.capacity - lsn % self.capacity
            return (Record(WRAP, 0, 0, None), room) if _checksum(header) == check else (
                None, 0)  # fmt: skip
        if kind not in (DATA, ZERO, PUNCH) or flags & ~OVERLAY or offset + length > origin_size:
            return None, 0
        extra = _EPOCH.size if flags & OVERLAY else 0
        body_len = extra + (length if kind == DATA else 0)
        if RECORD_HEADER + body_len > self.capacity - lsn % self.capacity:
            return None, 0
        body = pread_full(self.fd, body_len, phys + RECORD_HEADER) if body_len else b""
        if _checksum(header, body) != check:
            return None, 0
        epoch = _EPOCH.unpack_from(body)[0] if extra else None
        data = body[extra:] if kind == DATA else None
        record = Record(kind, offset, length, data, epoch, lsn)
        return record, _align8(RECORD_HEADER + body_len)

    def restart(self) -> None:
        """After a replay and an fdatasync of the origin: an empty journal of the next
        generation, starting where the replay ended (durable on return)."""
        self.generation = (self.generation + 1) & 0xFFFFFFFF or 1
        self._write_header(self.head)
        self.start = self.head

    # --- running -------------------------------------------------------------------------

    def used(self) -> int:
        return self.head - self.start

    def append(
        self,
        kind: int,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None,
        epoch: int | None = None,
    ) -> int | None:
        """Append one record (not durable until `sync`): an overlay record if `epoch` is
        given. Returns its log position; None, appending nothing, when the journal does not
        take it (too large, or no room before the next checkpoint)."""
        if kind == DATA and length > MAX_DATA:
            return None
        extra = 0 if epoch is None else _EPOCH.size
        size = _align8(RECORD_HEADER + extra + (length if kind == DATA else 0))
        lsn = self.head
        room = self.capacity - lsn % self.capacity
        waste = room if size > room else 0
        if lsn + waste + size - self.start > self.capacity:
            return None
        faults.hit("journal.append")
        if isinstance(data, bytearray) or isinstance(data, memoryview) and not data.readonly:
            # an overlay's write-back passes the overlay itself, which a later write may
            # change while the record is checksummed and written: a record whose bytes do
            # not match its checksum would end every replay there
            data = bytes(data)
        if waste:
            if room >= RECORD_HEADER:
                self._write(WRAP, 0, 0, None, None, lsn)
            lsn += waste
        self._write(kind, offset, length, data, epoch, lsn)
        self.head = lsn + size
        return lsn

    def _write(
        self,
        kind: int,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None,
        epoch: int | None,
        lsn: int,
    ) -> None:
        flags = 0 if epoch is None else OVERLAY
        header = _RECORD.pack(RECORD_MAGIC, kind, flags, self.generation, length, lsn, offset)
        tag = None if epoch is None else _EPOCH.pack(epoch)
        buffers: list[bytes | bytearray | memoryview] = [header, _checksum(header, tag, data)]
        for part in (tag, data):
            if part is not None:
                buffers.append(part)
        total = sum(len(b) for b in buffers)
        if os.pwritev(self.fd, buffers, RING + lsn % self.capacity) != total:
            raise OSError(errno.ENOSPC, "short write to the origin journal")

    def sync(self) -> None:
        """Every record appended before this call is durable on return."""
        faults.hit("journal.sync")
        os.fdatasync(self.fd)

    def advance(self, start: int) -> None:
        """The origin is durable up to the record at `start`: replays begin there now.
        The ring before `start` is free for new records only once the header saying so is
        durable (a replay from the older header must still find the records after it)."""
        self._write_header(start)
        self.start = start

    def close(self) -> None:
        os.close(self.fd)
