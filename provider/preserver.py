"""The preserve pipeline: the queue of preserves and the thread that makes them durable.

Design notes
- A preserve is queued by the write that first touches a chunk a live snapshot needs
  (`queue_nowait`, called under the engine lock). Queued preserves carry an engine-wide
  sequence number; `applied_seq` says how far they have been applied, so FLUSH waits for
  the sequence number it saw (a sequence point), never for an empty queue.
- The thread takes up to MAX_BATCH preserves at a time (group commit). Outside the lock it
  hashes and writes their data, fdatasyncs each diff area touched, and commits their
  catalog rows in one transaction. Then, under the lock, each preserve is indexed
  (CowVolume.commit_preserved). Never the other order. Its overlay is then written to the
  origin outside the lock (a slow origin must not stall every reader and the hold of
  snapshot creation), in rounds while later writes change it; the preserve leaves the
  overlay, and `applied_seq` moves, only once the origin has the overlay's final bytes.
- A preserve that fails (diff-area I/O error, ENOSPC from its filesystem, a catalog error)
  still lets its write reach the origin: the snapshots that needed the chunk are marked
  invalid instead (DESIGN.md: a diff-area error after the ack invalidates, never drops).
- A write-back the origin refuses (EIO, ENOSPC) leaves its preserve in the overlay
  (`CowVolume.write_back_failed`): reads and writes keep using it, its journal records stay
  pinned, and this thread tries the whole chunk again every RETRY_INTERVAL until the
  origin takes it. The first failure goes to the next FLUSH; the sequence number moves on
  (a FLUSH waits for it no longer; a write it did not journal fails every FLUSH while it
  waits: `Engine.flush`).
- An entry nobody needs any more when it is applied (its snapshot was deleted meanwhile) is
  handed back to the engine to be freed, never leaked.
- Snapshot state changes found on the I/O path (damaged, invalid) are persisted here too,
  so no trio thread ever waits for a catalog commit.

The lock is the engine's condition; this class never takes any other lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from . import faults
from .catalog import Catalog
from .cow import ZERO, CowVolume, Entry, Pending, entry_row
from .diffarea import chunk_hash

log = logging.getLogger("shadowblk.preserver")

MAX_BATCH = 512  # preserves per group commit
WRITE_BACK_ROUNDS = 3  # rounds of overlay write-back outside the lock before one under it
RETRY_INTERVAL = 1.0  # seconds between two tries of a write-back the origin refused

Freed = dict[CowVolume, list[tuple[int, Entry]]]
Ranges = list[list[int]]


class Gate:
    """A turnstile in front of the engine lock, so the preserver gets it in turn.

    Python locks are not fair: a thread that releases the engine lock and takes it again at
    once (the trio thread serving a stream of small writes) can starve the preserver, which
    then applies nothing while the overlay fills. The preserver holds the gate while it
    waits for the lock; the I/O path passes through the gate before taking the lock, so it
    queues behind the preserver instead of overtaking it. Cost when uncontended: one
    acquire and release of a free lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def pass_through(self) -> None:
        self._lock.acquire()
        self._lock.release()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Preserver:
    """The queue of pending preserves and the thread that commits them in batches."""

    def __init__(
        self,
        cond: threading.Condition,
        gate: Gate,
        catalog: Catalog,
        free: Callable[[CowVolume, list[tuple[int, Entry]]], None],
        stats: dict[str, int],
        on_applied: Callable[[], None] = lambda: None,
    ) -> None:
        self._cond = cond
        self._gate = gate
        self._catalog = catalog
        self._free = free
        self._stats = stats
        self._on_applied = on_applied  # called under the lock after each batch is applied
        self._queue: list[Pending] = []
        self._state_updates: list[tuple[str, str]] = []  # (snapshot id, state)
        self._stuck: list[Pending] = []  # write-backs the origin refused, to try again
        self._retry_at = 0.0  # monotonic time of the next try
        self._stopping = False
        self.queued_seq = 0
        self.applied_seq = 0
        self.overlay_bytes = 0  # bytes of acknowledged writes awaiting their preserve
        self._thread = threading.Thread(target=self._loop, name="preserver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every queued preserve, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # --- called under the engine lock ----------------------------------------------------

    def queue_nowait(self, vol: CowVolume, chunk: int, old: bytes, slot: int) -> Pending:
        """Queue the preserve of `chunk`'s current contents `old` into `slot` (or ZERO)."""
        self.queued_seq += 1
        pending = Pending(vol, chunk, vol.epoch, old, bytearray(old), slot, None, self.queued_seq)
        vol.pending[chunk] = pending
        self._queue.append(pending)
        self.overlay_bytes += len(old)
        self._cond.notify_all()
        return pending

    def record_state_nowait(self, snapshot_id: str, state: str) -> None:
        """Persist a snapshot's new state (damaged, invalid) from the preserver thread."""
        self._state_updates.append((snapshot_id, state))
        self._cond.notify_all()

    def wait_applied(self, seq: int) -> None:
        """Block until every preserve up to `seq` is applied (lock held; waits on it)."""
        while self.applied_seq < seq:
            self._cond.wait()

    # --- the thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._state_updates and not self._stopping:
                    if self._retry_due():
                        break
                    self._cond.wait(self._retry_wait())
                last = self._stopping and not self._queue and not self._state_updates
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                updates, self._state_updates = self._state_updates, []
            if last:
                self._retry_at = 0.0  # one last try; what still fails stays in the journal
                self._retry()
                return
            try:
                if updates:
                    self._persist_states(updates)
                if batch:
                    self._run_batch(batch)
                self._retry()
            except Exception:  # never let the thread die: writes would wait for it forever
                log.exception("preserver: unexpected error")

    def _retry_due(self) -> bool:
        return bool(self._stuck) and time.monotonic() >= self._retry_at

    def _retry_wait(self) -> float | None:
        return max(0.0, self._retry_at - time.monotonic()) if self._stuck else None

    def _retry(self) -> None:
        """Try again the write-backs the origin refused, if it is time (lock not held)."""
        if not self._retry_due():
            return
        stuck, self._stuck = self._stuck, []
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        with self._locked():
            work = [(p, p.take_ranges()) for p in stuck]
        self._write_back(stuck, work)

    def _run_batch(self, batch: list[Pending]) -> None:
        try:
            self._persist(batch)
            failed: Exception | None = None
        except Exception as e:  # a diff-area or catalog error: the snapshots lose, never the write
            log.error("preserving %d chunks failed: %s", len(batch), e)
            failed = e
            self._invalidate(batch, str(e))
        garbage: Freed = {}
        with self._locked():
            for p in batch:
                self._apply(p, failed, garbage)
            work = [(p, p.take_ranges()) for p in batch]
        self._write_back(batch, work)
        for vol, freed in garbage.items():
            self._free(vol, freed)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The engine lock, taken through the gate (see Gate)."""
        with self._gate:
            self._cond.acquire()
        try:
            yield
        finally:
            self._cond.release()

    def _write_back(self, batch: list[Pending], work: list[tuple[Pending, Ranges]]) -> None:
        """The batch's overlays to the origin, outside the engine lock; what later writes
        changed meanwhile goes in another round, and the last round runs under the lock (a
        chunk written without pause cannot keep its preserve open). Then the batch leaves
        the overlay and its sequence number is applied."""
        errors: dict[int, OSError] = {}
        for _ in range(WRITE_BACK_ROUNDS):
            self._write_ranges(work, errors)
            with self._locked():
                # every preserve of the batch: one written back in an earlier round may
                # have been written to again since
                work = [(p, p.take_ranges()) for p in batch if p.dirty]
                if not work:
                    self._finish(batch, errors)
                    return
        with self._locked():
            self._write_ranges(work, errors)
            self._write_ranges([(p, p.take_ranges()) for p in batch if p.dirty], errors)
            self._finish(batch, errors)

    def _write_ranges(self, work: list[tuple[Pending, Ranges]], errors: dict[int, OSError]) -> None:
        for p, ranges in work:
            error = p.volume.write_back(p, ranges) if ranges else None
            if error is not None:
                errors.setdefault(id(p), error)

    def _finish(self, batch: list[Pending], errors: dict[int, OSError]) -> None:
        """The batch leaves the overlay, but for the write-backs that failed (lock held)."""
        for p in batch:
            error = errors.get(id(p))
            if error is None:
                p.stuck = None
                p.volume.finish_preserve(p)
                self.overlay_bytes -= len(p.new)
                continue
            if not self._stuck:
                self._retry_at = time.monotonic() + RETRY_INTERVAL
            if p.stuck is None:
                log.error("volume %s: chunk %d could not be written back to the origin (%s): "
                          "kept in the overlay, tried again every %.0f s",
                          p.volume.name, p.chunk, error, RETRY_INTERVAL)  # fmt: skip
            p.volume.write_back_failed(p, error)
            self._stuck.append(p)
        self.applied_seq = max(self.applied_seq, batch[-1].seq)  # a retry's are older
        self._cond.notify_all()
        self._on_applied()

    def _persist(self, batch: list[Pending]) -> None:
        """Write and sync the data of a batch, then commit its entries: durable on return."""
        diffs = {}
        for p in batch:
            if p.slot != ZERO:
                p.hash = chunk_hash(p.old)
                faults.hit("preserve.write")
                p.volume.diff.write(p.slot, p.old)
                faults.hit("preserve.written")
                diffs[id(p.volume.diff)] = p.volume.diff
        for diff in diffs.values():
            faults.hit("preserve.sync")
            diff.sync()
        faults.hit("preserve.commit")
        with self._catalog.transaction() as t:
            t.insert_chunks(
                [entry_row(p.volume.id, p.chunk, (p.epoch, p.slot, p.hash)) for p in batch]
            )
        faults.hit("preserve.committed")
        self._stats["commits"] += 1

    def _invalidate(self, batch: list[Pending], why: str) -> None:
        """Mark invalid, durably, every snapshot that needed a chunk of a failed batch:
        the mark must be on disk before the overlay overwrites the origin, or a crash in
        between would leave an `ok` snapshot reading the new bytes."""
        with self._cond:
            updates = [u for p in batch for u in self._invalidate_readers(p, why)]
        if updates:
            self._persist_states(updates)

    def _apply(self, p: Pending, failed: Exception | None, garbage: Freed) -> None:
        vol = p.volume
        if failed is not None:  # its readers were invalidated by _invalidate
            if p.slot != ZERO:  # its write still reaches the origin: it was acknowledged
                vol.diff.unallocate(p.slot)
            return
        self._stats["chunks_preserved"] += 1
        if p.slot == ZERO:
            self._stats["zero_entries"] += 1
        if not vol.commit_preserved(p):
            entry = (p.epoch, p.slot, p.hash)
            vol.remove_entry(p.chunk, entry)
            garbage.setdefault(vol, []).append((p.chunk, entry))

    def _invalidate_readers(self, p: Pending, why: str) -> list[tuple[str, str]]:
        """Mark invalid (in memory) every live snapshot that needed the chunk whose preserve
        failed (newer snapshots read the overlay); returns the state updates to persist.
        Lock held."""
        entries = p.volume.index.get(p.chunk)
        newest = entries[-1][0] if entries else -1
        updates = []
        for snap in p.volume.snapshots.values():
            if newest < snap.epoch <= p.epoch and snap.state != "invalid":
                log.error("snapshot %s is invalid: %s", snap.name, why)
                snap.state = "invalid"
                updates.append((snap.id, "invalid"))
        return updates

    def _persist_states(self, updates: list[tuple[str, str]]) -> None:
        try:
            with self._catalog.transaction() as t:
                t.executemany(
                    "UPDATE snapshots SET state=? WHERE id=?",
                    [(state, sid) for sid, state in updates],
                )
        except Exception as e:
            log.error("could not record snapshot states: %s", e)
