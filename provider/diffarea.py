"""A volume's diff area: the directory that holds its preserved chunks.

Layout (docs/format.md has the byte-level description):
- `shadowblk-diff-area.json`: the marker, `{"format": 1, "volume_uuid": ..., "chunk_size": ...}`.
  A directory without it (an unmounted filesystem, a wrong path) is refused, never taken
  for an empty diff area.
- `chunks.dat`: slot i holds one preserved chunk at byte offset i * chunk_size. A slot is
  either used (referenced by exactly one catalog entry) or free (a hole, or garbage left by
  a crash before its entry committed).

Ordering (DESIGN.md "Durability contract"):
- a slot's data is written and `sync()`ed before its catalog entry commits;
- a freed slot is punched only after the free committed, and `release()`d for reuse after
  that, so a crash never lets a slot be both referenced and overwritten.

The slot allocator is in memory: the free slots below the high-water mark, in a 64-bit
roaring bitmap. It is rebuilt at open from the catalog (every slot not referenced is free),
so its size follows the number of changed chunks, never the volume size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import xxhash
from pyroaring import BitMap64

from .errors import DamagedData, FormatError
from .fileio import fsync_dir, preadv_full, punch_hole, pwrite_full

MARKER = "shadowblk-diff-area.json"
DATA = "chunks.dat"
MARKER_FORMAT = 1


BLOCK = 4096  # checksum granularity: a read checks only the blocks it touches
BLOCK_HASH = 8  # bytes of one block's checksum


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The checksum stored for every preserved chunk: the xxh3-64 digest (big-endian) of
    each 4 KiB block, concatenated (the last block may be short). Per block, so a 4 KiB
    read of a 64 KiB chunk reads and checks 4 KiB, not the chunk."""
    digest = xxhash.xxh3_64_digest
    if len(data) <= BLOCK:
        return digest(data)
    view = memoryview(data)
    return b"".join([digest(view[i : i + BLOCK]) for i in range(0, len(view), BLOCK)])


def legacy_chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """Catalog format 1's checksum: xxh3-128 of the whole chunk (read only to migrate)."""
    return xxhash.xxh3_128_digest(data)


class DiffArea:
    """The preserved-chunk store of one volume."""

    def __init__(self, path: Path, volume_uuid: str, chunk_size: int) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self._check_marker(volume_uuid)
        self.fd = os.open(path / DATA, os.O_RDWR | os.O_CLOEXEC)
        self.hwm = -(-os.fstat(self.fd).st_size // chunk_size)
        self.free = BitMap64()

    @classmethod
    def create(cls, path: Path, volume_uuid: str, chunk_size: int) -> DiffArea:
        """Make a new diff area directory (its parent must exist); durable on return."""
        path.mkdir(mode=0o700)
        marker = {"format": MARKER_FORMAT, "volume_uuid": volume_uuid, "chunk_size": chunk_size}
        tmp = path / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker) + "\n")
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        tmp.rename(path / MARKER)
        fd = os.open(path / DATA, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.fsync(fd)
        os.close(fd)
        fsync_dir(path)
        fsync_dir(path.parent)
        return cls(path, volume_uuid, chunk_size)

    def _check_marker(self, volume_uuid: str) -> None:
        try:
            marker = json.loads((self.path / MARKER).read_text())
        except FileNotFoundError:
            raise FormatError(
                f"diff area {self.path} has no shadowblk marker: is its filesystem mounted?"
            ) from None
        except (OSError, ValueError) as e:
            raise FormatError(f"diff area {self.path}: unreadable marker: {e}") from e
        if marker.get("volume_uuid") != volume_uuid:
            raise FormatError(
                f"diff area {self.path} belongs to volume {marker.get('volume_uuid')}, "
                f"not {volume_uuid}"
            )
        if marker.get("chunk_size") != self.chunk_size:
            raise FormatError(f"diff area {self.path}: chunk size does not match the catalog")

    def set_used(self, used: BitMap64) -> None:
        """At open: every slot below the high-water mark not in `used` is free."""
        if used:
            self.hwm = max(self.hwm, used.max() + 1)
        self.free = BitMap64()
        if self.hwm:
            self.free.add_range(0, self.hwm)
            self.free -= used

    def allocate(self) -> int:
        """A slot to write a new preserved chunk into (lowest free first)."""
        if self.free:
            slot = self.free.min()
            self.free.discard(slot)
            return int(slot)
        self.hwm += 1
        return self.hwm - 1

    def unallocate(self, slot: int) -> None:
        """Give back a slot that was allocated but never committed (its data is garbage)."""
        self.free.add(slot)

    def used_slots(self) -> int:
        return self.hwm - len(self.free)

    def used_bytes(self) -> int:
        """Bytes of preserved data (used slots), the quantity `--max-diff` limits."""
        return self.used_slots() * self.chunk_size

    def write(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        pwrite_full(self.fd, data, slot * self.chunk_size)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def read(
        self, slot: int, length: int, expected: bytes, start: int = 0, stop: int | None = None
    ) -> bytes:
        """Bytes [start, stop) (default: all) of the preserved chunk of `length` bytes in
        `slot`, checked block by block like `Gather`'s reads, in one system call."""
        stop = length if stop is None else stop
        lo, hi = _blocks(start, stop, length)
        try:
            data = os.pread(self.fd, hi - lo, slot * self.chunk_size + lo)
        except OSError as e:
            raise DamagedData(f"diff area {self.path}: read of slot {slot} failed: {e}") from e
        if len(data) < hi - lo:  # past the end of the file: zeroes, as a disk reads
            data += bytes(hi - lo - len(data))
        first = lo // BLOCK * BLOCK_HASH
        if hi - lo <= BLOCK:  # one block, the common small read: chunk_hash inline
            if xxhash.xxh3_64_digest(data) != expected[first : first + BLOCK_HASH]:
                self._check(data, expected[first : first + BLOCK_HASH], slot, -1)  # raises
        else:
            self._check(data, _block_hashes(expected, lo, hi), slot, -1)
        return data if lo == start and hi == stop else data[start - lo : stop - lo]

    def _check(
        self, data: bytes | bytearray | memoryview, hashes: bytes, slot: int, chunk: int
    ) -> None:
        if chunk_hash(data) != hashes:
            what = f"chunk {chunk} (slot {slot})" if chunk >= 0 else f"slot {slot}"
            raise DamagedData(f"diff area {self.path}: {what} fails its checksum")

    def punch(self, slots: list[int]) -> None:
        """Deallocate the data of freed slots (call only after the free is durable)."""
        for start, count in _runs(sorted(slots)):
            punch_hole(self.fd, start * self.chunk_size, count * self.chunk_size)

    def release(self, slots: list[int]) -> None:
        """Make punched slots available for reuse."""
        for slot in slots:
            self.free.add(slot)

    def reclaim_free(self) -> None:
        """At open: punch every free slot (finishes a reclaim a crash interrupted)."""
        for start, end in _bitmap_runs(self.free):
            punch_hole(self.fd, start * self.chunk_size, (end - start) * self.chunk_size)

    def close(self) -> None:
        os.close(self.fd)


IOV_LIMIT = 512  # buffers per preadv (IOV_MAX is 1024 on Linux)


@dataclass(slots=True)
class _Member:
    slot: int
    lo: int  # the blocks read: [lo, hi) of the chunk
    hi: int
    start: int  # the bytes wanted: [start, stop) of the chunk
    stop: int
    buf: memoryview  # where the blocks are read: `out` itself when they are the bytes wanted
    out: memoryview
    expected: bytes  # the blocks' checksums
    chunk: int


class Gather:
    """The preserved-chunk reads of one request, made together by `finish`.

    Each read covers whole 4 KiB blocks (straight into its destination when the bytes
    wanted are whole blocks) and is checked block by block against the entry's
    `chunk_hash`. Reads that follow each other in the file (chunks preserved together are
    in consecutive slots) go out in one preadv: a sequential read of an old snapshot costs
    a few system calls, not one per chunk.
    """

    def __init__(self, diff: DiffArea) -> None:
        self.diff = diff
        self._runs: list[tuple[int, list[_Member]]] = []  # (file offset, members)
        self._end = -1  # file offset just past the last run

    def add(
        self,
        slot: int,
        length: int,
        expected: bytes,
        start: int,
        stop: int,
        out: memoryview,
        chunk: int = -1,
    ) -> None:
        """Bytes [start, stop) of the chunk of `length` bytes in `slot`, into `out`."""
        lo, hi = _blocks(start, stop, length)
        buf = out if (lo, hi) == (start, stop) else memoryview(bytearray(hi - lo))
        hashes = _block_hashes(expected, lo, hi)
        member = _Member(slot, lo, hi, start, stop, buf, out, hashes, chunk)
        at = slot * self.diff.chunk_size + lo
        if at == self._end and len(self._runs[-1][1]) < IOV_LIMIT:
            self._runs[-1][1].append(member)
        else:
            self._runs.append((at, [member]))
        self._end = at + hi - lo

    def finish(self) -> None:
        """Read and check everything added. `DamagedData` (naming the chunk) at the first
        read that fails or mismatches: the destination buffers must then be thrown away."""
        fd, path = self.diff.fd, self.diff.path
        for at, members in self._runs:
            try:
                if len(members) == 1:  # the common case: one chunk's blocks
                    bufs, total = [members[0].buf], members[0].hi - members[0].lo
                else:
                    bufs, total = [m.buf for m in members], sum(m.hi - m.lo for m in members)
                if os.preadv(fd, bufs, at) < total:  # EOF, or short
                    for m in members:
                        preadv_full(fd, m.buf, m.slot * self.diff.chunk_size + m.lo)
            except OSError as e:
                raise DamagedData(f"diff area {path}: read at {at} failed: {e}") from e
            for m in members:
                self.diff._check(m.buf, m.expected, m.slot, m.chunk)
                if m.buf is not m.out:
                    m.out[:] = m.buf[m.start - m.lo : m.stop - m.lo]
        self._runs.clear()
        self._end = -1


def _blocks(start: int, stop: int, length: int) -> tuple[int, int]:
    """The whole 4 KiB blocks [lo, hi) of a chunk of `length` bytes that hold [start, stop)."""
    return start - start % BLOCK, min(length, -(-stop // BLOCK) * BLOCK)


def _block_hashes(expected: bytes, lo: int, hi: int) -> bytes:
    """The checksums of the blocks [lo, hi), out of a chunk's `chunk_hash`."""
    first = lo // BLOCK * BLOCK_HASH
    return expected[first : first + (hi - lo) // -BLOCK * -BLOCK_HASH]


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slot numbers as (first, count) runs of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


def _bitmap_runs(bitmap: BitMap64) -> list[tuple[int, int]]:
    """A bitmap's members as half-open [start, end) ranges."""
    return [(start, start + count) for start, count in _runs(list(bitmap))]
