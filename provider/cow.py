"""The copy-on-write model of one volume, in memory.

Design notes (DESIGN.md "Core model" is the contract; this is how it is kept)

State per volume, all guarded by the engine lock (the caller holds it for every method here):
- `epoch`: the current epoch E. Writes made now belong to E.
- `live_epochs`: sorted epochs of the live snapshots (each snapshot S opened epoch(S)).
- `index`: chunk -> its entries [(epoch, slot, hash)], sorted by epoch; slot ZERO (-1) and
  hash None mark a zero entry. Only changed chunks appear: memory follows changes.
- `done`: chunks with an entry at E (preserved this epoch: later writes go straight through).
- `pending`: chunk -> Pending, a preserve under way for its epoch (E, or an earlier one if a
  snapshot was created meanwhile: creation does not wait for preserves). `old` holds the
  contents the snapshots up to that epoch must keep (served to their reads), `new` the chunk
  as the origin must become (served to origin reads and to newer snapshots' reads, updated
  by later writes of the same epoch; a write of a later epoch waits until the preserve is
  applied, so `new` is what a newer snapshot saw). Every write to `new` is journaled as
  an overlay record (provider/journal.py), durable at the next sync without the preserve;
  a preserve with a write the journal did not take is `journaled` no more, and a sync
  waits for it as before. The origin itself is untouched until
  the preserve is durable; then the entry is indexed (commit_preserved) and the preserver
  writes `new` to the origin outside the lock (`take_ranges`, `write_back`: a slow origin
  stalls no other I/O), again for what later writes changed meanwhile, and only then
  drops the pending preserve (`finish_preserve`). Until then origin reads and writes still
  use `new`, and snapshot reads find the entry: none of them reads that chunk's origin.
  A write-back that fails keeps the preserve pending (`stuck`, `write_back_failed`) and
  its records pinned, and the preserver retries it: an acknowledged write is never
  dropped because the origin refused it once.

A chunk in epoch E is done, pending, or neither; done and pending only between the
indexing and the end of the write-back. "Neither" writes go
through `needs_preserve`: a live snapshot S needs c's current contents iff
p < epoch(S) <= E, where p is the epoch of c's newest entry (all entries are < E here).

Reading chunk c of snapshot S: the entry with the smallest epoch >= epoch(S); else a
pending preserve (its epoch E >= epoch(S)); else the origin. All under the lock, so a read
falling through to the origin never races the overwrite of that chunk: the overwrite is
held in `pending` until the entry is in the index, and both change in one locked step.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroaring import BitMap64

from . import faults
from .diffarea import DiffArea
from .journal import DATA as J_DATA
from .journal import PUNCH as J_PUNCH
from .journal import ZERO as J_ZERO
from .origin import Origin

Buffer = bytes | bytearray | memoryview

ZERO = -1  # the slot of a zero entry

_ZEROES: dict[int, bytes] = {}


def zeroes(length: int) -> bytes:
    """A shared, immutable run of zero bytes."""
    z = _ZEROES.get(length)
    if z is None:
        z = _ZEROES[length] = bytes(length)
    return z


Entry = tuple[int, int, bytes | None]  # (epoch, slot, xxh3-128)


Row = tuple[int, int, int, int | None, bytes | None]  # a `chunks` row of the catalog


def entry_row(volume_id: int, chunk: int, entry: Entry) -> Row:
    """An entry as the catalog's `chunks` row holds it (a zero entry: slot NULL)."""
    epoch, slot, digest = entry
    return (volume_id, chunk, epoch, None if slot == ZERO else slot, digest)


def _epoch(entry: Entry) -> int:
    return entry[0]


@dataclass
class Pending:
    """A preserve of one chunk for one epoch, from the first write until it is durable."""

    volume: CowVolume
    chunk: int
    epoch: int
    old: bytes
    new: bytearray
    slot: int  # ZERO for a zero entry
    hash: bytes | None
    seq: int  # the engine-wide order of preserves (flush waits for a sequence number)
    # what was done to `new`, in order: [start, end, how], how DATA, ZEROED or PUNCHED
    dirty: list[list[int]] = field(default_factory=list)
    journaled: bool = True  # every write to `new` is in the origin's journal
    pin: int | None = None  # the log position of its first (pinned) journal record
    stuck: OSError | None = None  # its write-back failed: kept in the overlay, retried

    def update(self, start: int, data: bytes | bytearray | memoryview, how: int = 0) -> None:
        """Apply a write (or, with `how`, a zeroing) to the overlay and remember the range:
        only it goes to the origin, the rest of the chunk equals the origin already."""
        end = start + len(data)
        self.new[start:end] = data
        last = self.dirty[-1] if self.dirty else None
        if last is not None and last[2] == how and last[0] <= end and start <= last[1]:
            last[0], last[1] = min(last[0], start), max(last[1], end)
        else:
            self.dirty.append([start, end, how])

    def take_ranges(self) -> list[list[int]]:
        """The ranges written so far, to be replayed on the origin; later writes start a new
        list (lock held)."""
        ranges, self.dirty = self.dirty, []
        return ranges

    def write_back(self, origin: Origin, base: int, ranges: list[list[int]]) -> None:
        """Replay `ranges` on the origin, in order: data from `new` (its contents now; a
        later write to it is in a later list of ranges, replayed after), zeroed ranges as
        zeroing (a hole where the volume is sparse). Journaled again only if some write
        to `new` was not (the pinned records hold the rest)."""
        faults.hit("origin.write")
        log = not self.journaled
        for start, end, how in ranges:
            if how == DATA:
                origin.pwrite(base + start, memoryview(self.new)[start:end], log)
            else:
                origin.zero(base + start, end - start, punch=how == PUNCHED, log=log)

    def journal_write(
        self, origin: Origin, offset: int, length: int, data: Buffer | None, how: int
    ) -> None:
        """Journal a write just made to `new` (at `offset` in the origin), pinning the
        first record; a write the journal does not take ends the journaling."""
        if not self.journaled:
            return
        kind = JOURNAL_KIND[how]
        lsn = origin.log_overlay(kind, offset, length, data, self.epoch, self.pin is None)
        if lsn is None:
            self.journaled = False
        elif self.pin is None:
            self.pin = lsn

    def read(self, epoch: int) -> bytes | bytearray:
        """The chunk as the snapshot that opened `epoch` sees it."""
        return self.old if epoch <= self.epoch else self.new


DATA, ZEROED, PUNCHED = 0, 1, 2  # how an overlay range was written
JOURNAL_KIND = {DATA: J_DATA, ZEROED: J_ZERO, PUNCHED: J_PUNCH}


@dataclass
class Snapshot:
    """A live snapshot record, as the engine keeps it in memory."""

    id: str
    volume: str
    seq: int
    epoch: int
    set_id: str
    created: str
    state: str
    label: str | None
    attrs: dict[str, Any] = field(default_factory=dict)
    pins: int = 0

    @property
    def name(self) -> str:
        return f"{self.volume}@{self.seq}"


class CowVolume:
    """One volume: its origin, its diff area and its copy-on-write state."""

    def __init__(self, row: Any, origin: Origin, diff: DiffArea) -> None:
        self.id: int = row["id"]
        self.name: str = row["name"]
        self.uuid: str = row["uuid"]
        self.size: int = row["size"]
        self.chunk_size: int = row["chunk_size"]
        self.epoch: int = row["epoch"]
        self.next_seq: int = row["next_seq"]
        self.row = dict(row)
        self.origin = origin
        self.diff = diff
        self.snapshots: dict[int, Snapshot] = {}
        self.live_epochs: list[int] = []
        # invalidated snapshots (the invalidate policy): listed, never read, holding no data
        self.invalid: dict[int, Snapshot] = {}
        self.origin_opens = 0  # open devices of the origin (NBD clients, FUSE opens)
        self.reverting = False  # a revert owns the origin: no device may open it
        self.origin_error: OSError | None = None  # a failed write-back, for the next FLUSH
        self.policy_victims = 0  # snapshots the full policy deleted or invalidated (this run)
        self.index: dict[int, list[Entry]] = {}
        self.changed = BitMap64()  # the chunks of `index`, ordered (range scans)
        self.done = BitMap64()
        self.pending: dict[int, Pending] = {}
        self.held = 0  # > 0 while a snapshot set holds this volume's writes
        self.warned = False  # the 90 % warning was logged

    # --- loading -------------------------------------------------------------------------

    def add_snapshot(self, snap: Snapshot) -> None:
        self.snapshots[snap.seq] = snap
        self.live_epochs.insert(bisect_left(self.live_epochs, snap.epoch), snap.epoch)

    def drop_snapshot(self, snap: Snapshot) -> None:
        del self.snapshots[snap.seq]
        self.live_epochs.remove(snap.epoch)

    def load_entry(self, chunk: int, epoch: int, slot: int | None, digest: bytes | None) -> None:
        """Add an entry read from the catalog (rows come ordered by chunk, epoch)."""
        self.index.setdefault(chunk, []).append((epoch, ZERO if slot is None else slot, digest))
        self.changed.add(chunk)
        if epoch == self.epoch:
            self.done.add(chunk)

    def used_slots(self) -> BitMap64:
        used = BitMap64()
        for entries in self.index.values():
            for entry in entries:
                slot = entry[1]
                if slot != ZERO:
                    used.add(slot)
        return used

    # --- the model -----------------------------------------------------------------------

    def chunk_len(self, chunk: int) -> int:
        return min(self.chunk_size, self.size - chunk * self.chunk_size)

    def needs_preserve(self, chunk: int) -> bool:
        """Does a live snapshot need chunk's current contents? (chunk neither done nor pending)"""
        if not self.live_epochs:
            return False
        if self.live_epochs[-1] == self.epoch:
            return True
        entries = self.index.get(chunk)
        newest = entries[-1][0] if entries else -1
        return self.live_epochs[-1] > newest

    def entry_needed(self, entries: list[Entry], i: int) -> bool:
        """Is entries[i] read by a live snapshot? (p < epoch(S) <= e)"""
        p = entries[i - 1][0] if i > 0 else -1
        j = bisect_right(self.live_epochs, p)
        return j < len(self.live_epochs) and self.live_epochs[j] <= entries[i][0]

    def replay_needs(self, chunk: int, epoch: int) -> bool:
        """At open: does a live snapshot need chunk preserved for `epoch`, with no entry
        for that epoch? (an overlay record of that epoch is about to be replayed)"""
        entries = self.index.get(chunk, [])
        if any(e[0] == epoch for e in entries):
            return False
        previous = max((e[0] for e in entries if e[0] < epoch), default=-1)
        j = bisect_right(self.live_epochs, previous)
        return j < len(self.live_epochs) and self.live_epochs[j] <= epoch

    def behind(self, offset: int, length: int) -> bool:
        """Is a chunk of the range pending for an earlier epoch? (a write must wait)"""
        if not self.pending or length == 0:
            return False
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        for c in range(first, last + 1):
            p = self.pending.get(c)
            if p is not None and p.epoch != self.epoch:
                return True
        return False

    def new_preserves(self, offset: int, length: int) -> int:
        """How many chunks a write of this range would start preserving now."""
        if not self.live_epochs or length == 0:
            return 0
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        return sum(
            1
            for c in range(first, last + 1)
            if c not in self.pending and c not in self.done and self.needs_preserve(c)
        )

    # --- reads ---------------------------------------------------------------------------

    def read_origin(self, offset: int, length: int) -> bytes | bytearray:
        """The live contents: the origin, with pending chunks served from their overlay."""
        if not self.pending:
            return self.origin.pread(offset, length)
        return self._assemble(offset, length, self._origin_source)

    def read_snapshot(
        self,
        epoch: int,
        offset: int,
        length: int,
        read_diff: Callable[[int, Entry, int, int, memoryview], None],
    ) -> bytes | bytearray:
        """Contents of the snapshot that opened `epoch`. `read_diff(chunk, entry, start,
        stop, out)` puts bytes [start, stop) of a preserved chunk into `out`."""
        if not self.index and not self.pending:
            return self.origin.pread(offset, length)

        def source(chunk: int, start: int, stop: int, out: memoryview) -> bool:
            entry = self.entry_for(chunk, epoch)
            if entry is not None:
                read_diff(chunk, entry, start, stop, out)
                return True
            pending = self.pending.get(chunk)
            if pending is None:
                return False
            out[:] = memoryview(pending.read(epoch))[start:stop]
            return True

        return self._assemble(offset, length, source)

    def entry_for(self, chunk: int, epoch: int) -> Entry | None:
        """The entry the snapshot that opened `epoch` reads `chunk` from: the one with the
        smallest epoch >= `epoch`; None: the pending preserve's old bytes, or the origin."""
        entries = self.index.get(chunk)
        if not entries:
            return None
        # (epoch,) sorts before every entry of that epoch: tuple comparison in C, no key
        # function called per step
        i = bisect_left(entries, (epoch,))
        return entries[i] if i < len(entries) else None

    def read_snapshot_small(
        self, epoch: int, offset: int, length: int
    ) -> bytes | bytearray | None:
        """The common small read of a snapshot, with one system call and nothing gathered:
        [offset, offset+length) within one chunk that awaits no preserve, read from the
        origin or from its preserved data (checked). None: use `read_snapshot`."""
        if not length:  # nothing to read (nor to check against a block's checksum)
            return b""
        cs = self.chunk_size
        chunk = offset // cs
        if (offset + length - 1) // cs != chunk or chunk in self.pending:
            return None
        entry = self.entry_for(chunk, epoch)
        if entry is None:
            return self.origin.pread(offset, length)
        if entry[1] == ZERO or entry[2] is None:
            return None
        start = offset - chunk * cs
        return self.diff.read(entry[1], self.chunk_len(chunk), entry[2], start, start + length)

    def _origin_source(self, chunk: int, start: int, stop: int, out: memoryview) -> bool:
        pending = self.pending.get(chunk)
        if pending is None:
            return False
        out[:] = memoryview(pending.new)[start:stop]
        return True

    def _assemble(
        self,
        offset: int,
        length: int,
        source: Callable[[int, int, int, memoryview], bool],
    ) -> bytearray:
        """Build a range chunk by chunk into one buffer, with no other copy:
        `source(chunk, start, stop, out)` puts those bytes of the chunk into `out`, or
        returns False for "read the origin". Consecutive chunks that come from the origin
        are read with one system call."""
        cs = self.chunk_size
        end = offset + length
        result = bytearray(length)
        view = memoryview(result)
        run_start = -1  # start of the pending run of origin bytes
        pos = offset
        while pos < end:
            chunk = pos // cs
            base = chunk * cs
            hi = min(end, base + cs)
            if source(chunk, pos - base, hi - base, view[pos - offset : hi - offset]):
                if run_start >= 0:
                    self.origin.pread_into(run_start, view[run_start - offset : pos - offset])
                    run_start = -1
            elif run_start < 0:
                run_start = pos
            pos = hi
        if run_start >= 0:
            self.origin.pread_into(run_start, view[run_start - offset : end - offset])
        return result

    # --- writes --------------------------------------------------------------------------

    def apply_write(
        self,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None,
        start_preserve: Callable[[CowVolume, int], Pending],
        punch: bool = False,
    ) -> None:
        """Apply a write (`data`), or a zeroing of the range (`data` None): straight to the
        origin where no snapshot needs the old contents, into the overlay (and a new
        preserve) where one does."""
        if not self.pending and not self.live_epochs:
            self._direct(offset, length, data, 0, punch)
            return
        cs = self.chunk_size
        end = offset + length
        run_start = -1
        pos = offset
        while pos < end:
            chunk = pos // cs
            hi = min(end, (chunk + 1) * cs)
            pending = self.pending.get(chunk)
            if pending is None and chunk not in self.done and self.needs_preserve(chunk):
                pending = start_preserve(self, chunk)
            if pending is None:
                if run_start < 0:
                    run_start = pos
            else:
                if run_start >= 0:
                    self._direct(run_start, pos - run_start, data, run_start - offset, punch)
                    run_start = -1
                base = chunk * cs
                if data is None:
                    how = PUNCHED if punch and self.row["sparse"] else ZEROED
                    pending.update(pos - base, zeroes(hi - pos), how)
                    pending.journal_write(self.origin, pos, hi - pos, None, how)
                else:
                    part = memoryview(data)[pos - offset : hi - offset]
                    pending.update(pos - base, part)
                    pending.journal_write(self.origin, pos, hi - pos, part, DATA)
            pos = hi
        if run_start >= 0:
            self._direct(run_start, end - run_start, data, run_start - offset, punch)

    def _direct(
        self,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None,
        skip: int,
        punch: bool,
    ) -> None:
        """Write (or zero) a range of the origin that no snapshot needs."""
        if data is None:
            self.origin.zero(offset, length, punch=punch and bool(self.row["sparse"]))
        else:
            self.origin.pwrite(offset, memoryview(data)[skip : skip + length])

    def commit_preserved(self, pending: Pending) -> bool:
        """The preserve is durable: index it (the preserver then writes the overlay back).

        Returns False when no live snapshot needs the new entry (its snapshot was deleted
        while the preserve ran): the caller frees it.
        """
        entries = self.index.setdefault(pending.chunk, [])
        entries.append((pending.epoch, pending.slot, pending.hash))
        self.changed.add(pending.chunk)
        if pending.epoch == self.epoch:  # a preserve of an earlier epoch: not done in this one
            self.done.add(pending.chunk)
        return self.entry_needed(entries, len(entries) - 1)

    def write_back(self, pending: Pending, ranges: list[list[int]]) -> OSError | None:
        """Replay `ranges` of the overlay on the origin (no lock needed: the chunk is
        pending, so nothing else reads or writes its origin bytes). Returns the origin's
        error, which the caller keeps for the next FLUSH (the write was acknowledged)."""
        try:
            pending.write_back(self.origin, pending.chunk * self.chunk_size, ranges)
        except OSError as e:
            return e
        return None

    def finish_preserve(self, pending: Pending) -> None:
        """The overlay is on the origin: out of the overlay (lock held)."""
        del self.pending[pending.chunk]
        if pending.pin is not None:
            self.origin.unpin(pending.pin)

    def write_back_failed(self, pending: Pending, error: OSError) -> None:
        """The overlay could not be written to the origin (lock held). It stays in the
        overlay, which reads and writes keep using, with all of `new` to write on the next
        try; its pinned records stay in the journal, the only durable copy of its
        journaled writes. The first failure is kept for the next FLUSH."""
        if pending.stuck is None and self.origin_error is None:
            self.origin_error = error
        pending.stuck = error
        pending.dirty.insert(0, [0, len(pending.new), DATA])
        if pending.pin is not None:
            self.origin.stall(pending.pin, error)

    # --- freeing -------------------------------------------------------------------------

    def unneeded_entries(self, chunks: Any = None) -> list[tuple[int, Entry]]:
        """Entries no live snapshot reads, over `chunks` (default: every changed chunk)."""
        found = []
        for chunk in self.index if chunks is None else chunks:
            entries = self.index.get(chunk, [])
            for i, entry in enumerate(entries):
                if not self.entry_needed(entries, i):
                    found.append((chunk, entry))
        return found

    def entries_read_by(self, epoch: int) -> list[tuple[int, Entry]]:
        """For each changed chunk, the entry a snapshot of `epoch` reads (at most one each)."""
        found = []
        for chunk in self.index:
            entry = self.entry_for(chunk, epoch)
            if entry is not None:
                found.append((chunk, entry))
        return found

    def remove_entry(self, chunk: int, entry: Entry) -> None:
        entries = self.index[chunk]
        entries.remove(entry)
        if not entries:
            del self.index[chunk]
            self.changed.discard(chunk)
        if entry[0] == self.epoch:
            self.done.discard(chunk)

    def insert_entry(self, chunk: int, entry: Entry) -> None:
        """Put back an entry `remove_entry` took out (a free that did not commit)."""
        entries = self.index.setdefault(chunk, [])
        entries.insert(bisect_left(entries, entry[0], key=_epoch), entry)
        self.changed.add(chunk)
        if entry[0] == self.epoch:
            self.done.add(chunk)

    def diff_bytes_by_epoch(self) -> dict[int, int]:
        """Bytes of diff-area data only one snapshot needs (what deleting it would free), by
        the snapshot's epoch, for every snapshot at once: one pass over the index."""
        totals = dict.fromkeys(self.live_epochs, 0)
        live = self.live_epochs
        for entries in self.index.values():
            previous = -1
            for epoch, slot, _ in entries:
                # the entry is read by the snapshots with epochs in (previous, epoch]
                j = bisect_right(live, previous)
                alone = j + 1 == len(live) or (j + 1 < len(live) and live[j + 1] > epoch)
                if slot != ZERO and j < len(live) and live[j] <= epoch and alone:
                    totals[live[j]] += self.chunk_size
                previous = epoch
        return totals
