"""The engine: volumes, snapshot sets, the preserve pipeline and the catalog, behind one API.

Design notes

Locks (always taken in this order):
- `_admin` serializes the operations that change the catalog's shape: volume create and
  remove, snapshot-set creation, snapshot deletion. They may block for long (fsync, a hold).
- `_lock` (with its condition `_cond`) guards every volume's in-memory copy-on-write state
  (provider/cow.py), the preserve queue and the counters. It is held only for in-memory
  work and page-cache I/O, never across an fsync, so the NBD server can call reads and
  `write_nowait` inline on its trio thread.

The write path (DESIGN.md "Durability contract"):
1. A write reaching a chunk that a live snapshot still needs starts a preserve: the old
   contents are read (under `_lock`, so nothing overwrites them meanwhile), a diff slot is
   reserved, and the write lands in the chunk's overlay (`Pending.new`). It can be
   acknowledged at once; the origin is not touched.
2. The preserver thread takes queued preserves in batches (group commit): it writes their
   data to the diff areas, fdatasyncs them, commits their entries to the catalog in one
   transaction (durable), and only then, under `_lock`, indexes them and writes the overlay
   to the origin.
3. `flush` waits until every preserve queued before it is applied (a sequence point, not an
   empty queue), then fdatasyncs the origins.

Snapshot-set creation holds writes on its volumes, waits for their preserves to drain,
makes the origins durable (Origin.sync: the journal's fdatasync), commits every snapshot
record in one transaction, opens the new epochs, and releases writes. The time of each of
these steps, for the last CREATE_HISTORY creations, is in `statistics()`.

Freeing (delete, or a preserve whose snapshot was deleted meanwhile): the entries are taken
out of the in-memory index under `_lock` (so each is freed exactly once), their rows are
deleted in one durable transaction, then the slots are punched, then released for reuse.
A crash after the commit leaves free slots unpunched: `open` punches every free slot.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from pyroaring import BitMap64

from . import extents, faults
from .api import HOLD_TIMEOUT, SnapshotInfo, VolumeInfo
from .catalog import Catalog
from .cow import ZERO, CowVolume, Entry, Pending, Snapshot, entry_row, zeroes
from .diffarea import DiffArea, Gather, chunk_hash, legacy_chunk_hash
from .errors import (
    AlreadyExists,
    Busy,
    DamagedData,
    FormatError,
    HoldTimeout,
    InsufficientStorage,
    InvalidArgument,
    InvalidState,
    MaxSnapshots,
    NotFound,
    NotSupported,
    OutOfRange,
    ShadowblkError,
)
from .exports import OriginDevice, SnapshotDevice
from .fileio import flock_exclusive, pread_full
from .journal import DATA as J_DATA
from .journal import NAME as JOURNAL
from .journal import Record
from .origin import CheckpointWait, Origin, OverlayStuck
from .preserver import Gate, Preserver
from .volumes import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_SNAPSHOTS,
    Provisioned,
    VolumeSpec,
    check_limits,
    discard_origin,
    provision,
    resolve_max_diff,
)
from .writeback import Writeback

log = logging.getLogger("shadowblk.engine")

OVERLAY_CAP = 4 * 1024 * 1024  # bytes of acknowledged writes awaiting their preserve
APPLIED, WAIT, FULL = "applied", "wait", "full"  # outcomes of Engine._try_apply
ZERO_BATCH = 32 << 20  # a TRIM or WRITE_ZEROES is preserved and applied this much at a time
CREATE_HISTORY = 256  # the last creations whose phase timings `statistics` reports

Buffer = bytes | bytearray | memoryview


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Engine:
    """All volumes of one state directory."""

    def __init__(self, state_dir: Path, lock_fd: int, catalog: Catalog) -> None:
        self.state_dir = state_dir
        self._lock_fd = lock_fd
        self.catalog = catalog
        self._admin = threading.Lock()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._volumes: dict[str, CowVolume] = {}
        self.unavailable: dict[str, str] = {}  # volume name -> why it could not be opened
        self._exports: dict[str, int] = {}  # volume name -> open devices
        self.stats = {
            "commits": 0, "chunks_preserved": 0, "zero_entries": 0, "writes": 0, "flushes": 0
        }  # fmt: skip
        # where the last creations' time went, in ms, oldest first (see _commit_set)
        self._create_phases: deque[dict[str, float]] = deque(maxlen=CREATE_HISTORY)
        self._writeback = Writeback(
            lambda: [v.origin for v in list(self._volumes.values())], catalog
        )
        catalog.on_commit = self._writeback.poke
        # creation's origin syncs, beside its catalog work (more than one: a sync stuck past
        # its creation's hold limit must not hold up the next creation)
        self._syncers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="create-sync")
        self._gate = Gate()  # lets the preserver take `_lock` between inline I/O calls
        # one-shot callbacks of writes waiting outside a thread (wait_writable)
        self._waiters: list[Callable[[], None]] = []
        self._preserver = Preserver(
            self._cond, self._gate, catalog, self._free, self.stats, self._wake_waiters
        )

    # --- lifecycle -----------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> Engine:
        """Lock the state directory, open the catalog and every volume, recover, start."""
        path = Path(state_dir).absolute()
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = flock_exclusive(path / "lock", f"state directory {path}")
        engine = None
        try:
            engine = cls(path, lock_fd, Catalog(path / "catalog.db"))
            engine._load()
        except BaseException as e:
            if engine is not None:
                engine._abandon()
            os.close(lock_fd)
            if isinstance(e, sqlite3.Error | UnicodeError):
                raise FormatError(f"catalog {path / 'catalog.db'} is damaged: {e}") from e
            raise
        engine._preserver.start()
        engine._writeback.start()
        try:
            engine._release_auto()
        except BaseException:
            engine.close()
            raise
        return engine

    def _release_auto(self) -> None:
        """Delete the auto-release snapshots a previous run left (their requesters are
        gone with it), before anyone can use them."""
        for vol in list(self._volumes.values()):
            for snap in list(vol.snapshots.values()) + list(vol.invalid.values()):
                if snap.attrs.get("auto_release"):
                    log.info("deleting auto-release snapshot %s (its requester is gone)", snap.name)
                    self.delete_snapshot(snap.name, force=True)

    def close(self) -> None:
        """Drain every preserve, make the origins durable, release everything."""
        self._preserver.stop()
        self._writeback.stop()
        self._syncers.shutdown()
        for vol in self._volumes.values():
            lost = [p.chunk for p in vol.pending.values() if p.stuck and not p.journaled]
            if lost:  # in memory only: every FLUSH since has failed for them
                log.error("volume %s: writes to chunk(s) %s never reached the origin, which "
                          "refused them; they are lost", vol.name, lost[:10])  # fmt: skip
            try:
                vol.origin.checkpoint()
            except OverlayStuck as e:  # the preserver's last try failed too
                log.error("%s: the journal is kept as it is, and replayed at the next start", e)
                vol.origin.sync_uncut()
            vol.origin.close()
            vol.diff.close()
        self._volumes.clear()
        self.catalog.close()
        os.close(self._lock_fd)

    def _abandon(self) -> None:
        """Release what a failed open had opened (origins are locked while open)."""
        self._syncers.shutdown(wait=False)
        for vol in self._volumes.values():
            with contextlib.suppress(OSError):
                vol.origin.close()
                vol.diff.close()
        self._volumes.clear()
        with contextlib.suppress(Exception):
            self.catalog.close()

    def _load(self) -> None:
        for row in self.catalog.query("SELECT * FROM volumes ORDER BY id"):
            try:
                name = row["name"]
                missing = VOLUME_COLUMNS - set(row.keys())
            except (IndexError, KeyError):
                missing = {"name"}
            if missing:
                columns = ", ".join(sorted(missing))
                raise FormatError(f"the catalog's volumes table is damaged: no column {columns}")
            try:
                self._volumes[name] = self._open_volume(row)
            except (ShadowblkError, OSError) as e:
                log.error("volume %s is unavailable: %s", name, e)
                self.unavailable[name] = str(e)
            except Exception as e:  # damaged metadata: refuse this volume, never the service
                log.exception("volume %s is unavailable: its catalog rows are damaged", name)
                self.unavailable[name] = f"its catalog rows are damaged ({e!r})"

    def _open_volume(self, row: Any) -> CowVolume:
        origin = Origin.open(Path(row["origin"]))
        diff = None
        try:
            if origin.size < row["size"]:
                raise InvalidArgument(
                    f"origin {origin.path} is {origin.size} bytes, smaller than the volume's "
                    f"{row['size']}"
                )
            diff = DiffArea(Path(row["diff_area"]), row["uuid"], row["chunk_size"])
            vol = CowVolume(row, origin, diff)
            self._load_volume(vol, row)
        except BaseException:
            origin.close()
            if diff is not None:
                diff.close()
            raise
        origin.on_dirty = self._writeback.poke
        return vol

    def _load_volume(self, vol: CowVolume, row: Any) -> None:
        """A volume's snapshots and entries from the catalog (each entry checked against
        the volume and its diff area: a damaged one refuses the volume), its journal
        replayed onto the origin (what its overlay records overwrite preserved first),
        then recovery."""
        for s in self.catalog.query(
            "SELECT * FROM snapshots WHERE volume_id=? ORDER BY seq", (vol.id,)
        ):
            snap = _snapshot_from_row(s, vol.name)
            if snap.state == "invalid":  # listed only; its data is freed by _recover
                vol.invalid[snap.seq] = snap
            else:
                vol.add_snapshot(snap)
        for chunk, epoch, slot, digest in self.catalog.iter_chunks(vol.id):
            if not _entry_fits(vol, chunk, epoch, slot, digest, bool(row["legacy_checksums"])):
                raise FormatError(
                    f"volume {vol.name}: catalog entry (chunk {chunk}, epoch {epoch}, slot "
                    f"{slot}) does not fit the volume or its diff area: refusing the volume"
                )
            vol.load_entry(chunk, epoch, slot, digest)
        if row["legacy_checksums"]:
            self._rehash(vol)
        vol.diff.set_used(vol.used_slots())
        records, nbytes = vol.origin.attach_journal(
            vol.diff.path / JOURNAL, row["uuid"], partial(self._preserve_replayed, vol)
        )
        if records:
            log.warning("volume %s: replayed %d journal records (%d bytes) onto the origin",
                        vol.name, records, nbytes)  # fmt: skip
        self._recover(vol)
        if row["revert_epoch"] is not None:
            log.warning("volume %s: finishing the revert a crash interrupted", vol.name)
            self._run_revert(vol, row["revert_epoch"])

    def _preserve_replayed(self, vol: CowVolume, records: list[Record]) -> None:
        """Before a journal is replayed: an overlay record was acknowledged before its
        chunk's preserve (for the record's epoch) was durable, and a crash may have taken
        the preserve. For each such preserve that never committed and that a live snapshot
        needs, preserve the chunk as the origin and the records before the first of them
        leave it; durably, before any record reaches the origin (so a crash during the
        replay finds them committed and replays the same records again)."""
        cs = vol.chunk_size
        firsts: dict[tuple[int, int], int] = {}  # (chunk, epoch) -> its first record
        for i, r in enumerate(records):
            if r.epoch is not None:
                firsts.setdefault((r.offset // cs, r.epoch), i)
        starts = sorted((i, key) for key, i in firsts.items() if vol.replay_needs(*key))
        if not starts:
            return
        chunks = sorted({chunk for _, (chunk, _) in starts})
        images = {c: bytearray(vol.origin.pread(c * cs, vol.chunk_len(c))) for c in chunks}
        found: dict[tuple[int, int], bytes] = {}
        for i, r in enumerate(records):
            while len(found) < len(starts) and starts[len(found)][0] == i:
                key = starts[len(found)][1]
                found[key] = bytes(images[key[0]])
            if len(found) == len(starts):
                break
            _paint_record(r, chunks, images, cs)
        rows = []
        for (chunk, epoch), old in found.items():
            slot, digest = ZERO, None
            if old != zeroes(len(old)):
                slot, digest = vol.diff.allocate(), chunk_hash(old)
                vol.diff.write(slot, old)
            rows.append((chunk, (epoch, slot, digest)))
        vol.diff.sync()
        with self.catalog.transaction() as t:
            t.insert_chunks([entry_row(vol.id, chunk, entry) for chunk, entry in rows])
        for chunk, entry in rows:
            vol.insert_entry(chunk, entry)
        log.warning("volume %s: preserved %d chunks that journaled writes overwrite (their "
                    "preserves were lost in a crash)", vol.name, len(rows))  # fmt: skip

    def _rehash(self, vol: CowVolume) -> None:
        """Catalog format 1 -> 2 for one volume: every preserved chunk is read, checked
        against its old xxh3-128 and given its per-block checksums, in one transaction.
        A chunk that fails the old check gets checksums that can never match: it stays
        damaged, as it was."""
        updates: list[tuple[bytes, int, int, int]] = []
        for chunk, entries in vol.index.items():
            length = vol.chunk_len(chunk)
            for i, (epoch, slot, digest) in enumerate(entries):
                if slot == ZERO:
                    continue
                try:
                    data = pread_full(vol.diff.fd, length, slot * vol.chunk_size)
                except OSError:
                    data = b""
                new = chunk_hash(data.ljust(length, b"\0"))
                if not data or legacy_chunk_hash(data) != digest:
                    log.error("volume %s: chunk %d, epoch %d is damaged", vol.name, chunk, epoch)
                    new = bytes(b ^ 0xFF for b in new)
                entries[i] = (epoch, slot, new)
                updates.append((new, vol.id, chunk, epoch))
        with self.catalog.transaction() as t:
            for update in updates:
                t.execute(
                    "UPDATE chunks SET hash=? WHERE volume_id=? AND chunk=? AND epoch=?", update
                )
            t.execute("UPDATE volumes SET legacy_checksums=0 WHERE id=?", (vol.id,))
        log.info("volume %s: %d chunk checksums moved to format 2", vol.name, len(updates))

    def _recover(self, vol: CowVolume) -> None:
        """Finish what a crash interrupted: free entries nobody needs, punch free slots."""
        garbage = vol.unneeded_entries()
        if garbage:
            log.info("volume %s: freeing %d unneeded entries", vol.name, len(garbage))
            for chunk, entry in garbage:
                vol.remove_entry(chunk, entry)
            self._free(vol, garbage)
        vol.diff.reclaim_free()

    # --- volumes -------------------------------------------------------------------------

    def create_volume(
        self,
        name: str,
        *,
        size: int | None = None,
        backing: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        diff_area: str | None = None,
        max_diff: int | str | None = None,
        full_policy: str = "delete-oldest",
        sparse: bool = False,
        max_snapshots: int = DEFAULT_MAX_SNAPSHOTS,
    ) -> VolumeInfo:
        """A new volume: a new file of `size` under the state directory, or `backing` adopted.
        `max_diff`: bytes, or "N%" of the volume's size."""
        spec = VolumeSpec(
            name, size, backing, chunk_size, diff_area, max_diff, full_policy, sparse,
            max_snapshots,
        )  # fmt: skip
        spec.validate()
        with self._admin:
            if name in self._volumes or name in self.unavailable:
                raise AlreadyExists(f"volume {name} already exists")
            vid = str(uuid.uuid4())
            others = [(v.name, v.origin) for v in self._volumes.values()]
            made = provision(spec, vid, self.state_dir, others)
            try:
                vol = self._insert_volume(spec, vid, made)
            except BaseException:
                made.discard()
                raise
            with self._lock:
                self._volumes[name] = vol
            return self._volume_info(vol)

    def _insert_volume(self, spec: VolumeSpec, vid: str, made: Provisioned) -> CowVolume:
        with self.catalog.transaction() as t:
            t.execute(
                "INSERT INTO volumes (name, uuid, size, chunk_size, origin, origin_kind, owned, "
                "diff_area, max_diff, full_policy, sparse, created, max_snapshots) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    spec.name,
                    vid,
                    made.origin.size,
                    spec.chunk_size,
                    str(made.origin.path),
                    made.origin.kind,
                    int(made.owned),
                    str(made.diff.path),
                    None
                    if spec.max_diff is None
                    else resolve_max_diff(spec.max_diff, made.origin.size),
                    spec.full_policy,
                    int(spec.sparse),
                    utc_now(),
                    spec.max_snapshots,
                ),
            )
        row = self.catalog.query("SELECT * FROM volumes WHERE name=?", (spec.name,))[0]
        made.origin.on_dirty = self._writeback.poke
        return CowVolume(row, made.origin, made.diff)

    def set_volume(
        self,
        name: str,
        *,
        max_diff: int | str | None = None,
        no_max_diff: bool = False,
        full_policy: str | None = None,
        max_snapshots: int | None = None,
    ) -> VolumeInfo:
        """Change a volume's diff limit (bytes or "N%"; `no_max_diff`: none), full policy
        or snapshot limit. A lower limit applies from the next preserve on."""
        check_limits(max_diff, full_policy, max_snapshots)
        with self._admin:
            vol = self._volume(name)
            changes: dict[str, Any] = {}
            if no_max_diff:
                changes["max_diff"] = None
            elif max_diff is not None:
                changes["max_diff"] = resolve_max_diff(max_diff, vol.size)
            if full_policy is not None:
                changes["full_policy"] = full_policy
            if max_snapshots is not None:
                changes["max_snapshots"] = max_snapshots
            if changes:
                with self.catalog.transaction() as t:
                    for column, value in changes.items():  # column names from the code above
                        t.execute(f"UPDATE volumes SET {column}=? WHERE id=?", (value, vol.id))
                with self._lock:
                    vol.row.update(changes)
                    vol.warned = False
                log.info("volume %s: %s", name, ", ".join(f"{k}={v}" for k, v in changes.items()))
            return self._volume_info(vol)

    def revert(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Roll the origin of snapshot `name`'s volume back to it, copying back only the
        chunks changed since; then delete it and every newer snapshot (their differences
        are gone from the origin); older ones stay intact. Refused (Busy) while the origin
        is open anywhere, and while N or a newer snapshot is open unless `force`.
        Resumable (I4): the target is committed first; a crash midway is finished at the
        next open, before any client. Returns {"volume", "snapshot", "chunks", "deleted"}."""
        with self._admin:
            vol, snap = self._find_snapshot(name)
            if vol.invalid.get(snap.seq) is snap or snap.state != "ok":
                raise InvalidState(f"snapshot {name} is {snap.state}: it cannot be reverted to")
            with self._lock:
                if vol.origin_opens:
                    raise Busy(
                        f"volume {vol.name} is open ({vol.origin_opens} client(s) or files): "
                        "disconnect or unmount it first"
                    )
                newer = [s for s in vol.snapshots.values() if s.epoch >= snap.epoch]
                pinned = [s.name for s in newer if s.pins]
                if pinned and not force:
                    raise Busy(f"snapshot(s) {', '.join(pinned)} in use: they would be deleted")
                vol.reverting = True
            try:
                self._drain([vol], None)
                with self.catalog.transaction() as t:
                    t.execute("UPDATE volumes SET revert_epoch=? WHERE id=?", (snap.epoch, vol.id))
                vol.row["revert_epoch"] = snap.epoch
                return self._run_revert(vol, snap.epoch)
            finally:
                with self._lock:
                    vol.reverting = False

    def _run_revert(self, vol: CowVolume, epoch: int) -> dict[str, Any]:
        """Copy back, sync, then in one transaction drop the entries and snapshots of epoch
        >= `epoch` and clear the target; then reclaim. Idempotent until that commit."""
        with self._lock:
            work = [(c, e) for c, e in vol.entries_read_by(epoch)]
            deleted = [s for s in vol.snapshots.values() if s.epoch >= epoch]
            target = next((s.name for s in deleted if s.epoch == epoch), f"epoch {epoch}")
        reads = Gather(vol.diff)
        for chunk, entry in work:  # the snapshot's bytes of every chunk changed since
            faults.hit("revert.copy")
            length = vol.chunk_len(chunk)
            if entry[1] == ZERO:
                vol.origin.zero(chunk * vol.chunk_size, length, punch=bool(vol.row["sparse"]))
                continue
            assert entry[2] is not None
            data = bytearray(length)
            reads.add(entry[1], length, entry[2], 0, length, memoryview(data), chunk)
            reads.finish()  # DamagedData: the revert stops here, resumable once repaired
            vol.origin.pwrite(chunk * vol.chunk_size, data)
        faults.hit("revert.sync")
        vol.origin.checkpoint()  # the copies on the origin itself: no replay goes before them
        faults.hit("revert.commit")
        with self._lock:
            freed = [(c, e) for c, entries in vol.index.items() for e in entries if e[0] >= epoch]
            for snap in deleted:
                vol.drop_snapshot(snap)
            for chunk, entry in freed:
                vol.remove_entry(chunk, entry)
            vol.done = BitMap64()
        with self.catalog.transaction() as t:
            t.executemany(
                "DELETE FROM chunks WHERE volume_id=? AND chunk=? AND epoch=?",
                [(vol.id, c, e[0]) for c, e in freed],
            )
            t.executemany("DELETE FROM snapshots WHERE id=?", [(s.id,) for s in deleted])
            t.execute("DELETE FROM snapsets WHERE id NOT IN (SELECT set_id FROM snapshots)")
            t.execute("UPDATE volumes SET revert_epoch=NULL WHERE id=?", (vol.id,))
        vol.row["revert_epoch"] = None
        slots = [e[1] for _c, e in freed if e[1] != ZERO]
        vol.diff.punch(slots)
        with self._lock:
            vol.diff.release(slots)
        log.info("volume %s reverted to %s: %d chunks copied back, %s deleted", vol.name,
                 target, len(work), ", ".join(s.name for s in deleted) or "nothing")  # fmt: skip
        return {"volume": vol.name, "snapshot": target, "chunks": len(work),
                "deleted": [s.name for s in deleted]}  # fmt: skip

    def remove_volume(self, name: str) -> None:
        """Remove a volume with no snapshots and no open exports; delete what shadowblk made."""
        with self._admin:
            if name in self.unavailable:
                self._forget_unavailable(name)
                return
            vol = self._volume(name)
            if vol.snapshots:
                raise Busy(f"volume {name} has {len(vol.snapshots)} snapshots: delete them first")
            if self._exports.get(name):
                raise Busy(f"volume {name} is exported to {self._exports[name]} client(s)")
            self._drain([vol], None)
            with self.catalog.transaction() as t:
                t.execute("DELETE FROM chunks WHERE volume_id=?", (vol.id,))
                t.execute("DELETE FROM volumes WHERE id=?", (vol.id,))
            with self._lock:
                del self._volumes[name]
            vol.origin.checkpoint()
            discard_origin(vol.origin, bool(vol.row["owned"]))
            vol.diff.close()
            shutil.rmtree(vol.diff.path, ignore_errors=True)

    def _forget_unavailable(self, name: str) -> None:
        with self.catalog.transaction() as t:
            (vid,) = t.execute("SELECT id FROM volumes WHERE name=?", (name,)).fetchone()
            t.execute("DELETE FROM chunks WHERE volume_id=?", (vid,))
            t.execute("DELETE FROM snapshots WHERE volume_id=?", (vid,))
            t.execute("DELETE FROM snapsets WHERE id NOT IN (SELECT set_id FROM snapshots)")
            t.execute("DELETE FROM volumes WHERE id=?", (vid,))
        del self.unavailable[name]

    def volumes(self) -> list[VolumeInfo]:
        with self._lock:
            return [self._volume_info(v) for v in self._volumes.values()]

    def _volume(self, name: str) -> CowVolume:
        vol = self._volumes.get(name)
        if vol is None:
            if name in self.unavailable:
                raise NotFound(f"volume {name} is unavailable: {self.unavailable[name]}")
            raise NotFound(f"no volume named {name}")
        return vol

    def _volume_info(self, vol: CowVolume) -> VolumeInfo:
        r = vol.row
        return VolumeInfo(
            name=vol.name,
            uuid=vol.uuid,
            size=vol.size,
            chunk_size=vol.chunk_size,
            origin=r["origin"],
            origin_kind=r["origin_kind"],
            diff_area=r["diff_area"],
            max_diff=r["max_diff"],
            full_policy=r["full_policy"],
            max_snapshots=r["max_snapshots"],
            policy_victims=vol.policy_victims,
            sparse=bool(r["sparse"]),
            snapshots=len(vol.snapshots),
            diff_bytes=vol.diff.used_bytes(),
            created=r["created"],
        )

    # --- snapshots -----------------------------------------------------------------------

    def create_snapshot_set(
        self,
        volumes: list[str],
        *,
        label: str | None = None,
        hold_timeout: float = HOLD_TIMEOUT,
        auto_release: bool = False,
    ) -> list[SnapshotInfo]:
        """One snapshot of each volume, all at the same instant, committed atomically (I3).
        `auto_release`: the set dies with its requester (the service deletes it when the
        requesting connection closes) and at the next start of the engine in any case."""
        if not volumes or len(set(volumes)) != len(volumes):
            raise InvalidArgument("a snapshot set needs one or more distinct volumes")
        with self._admin:
            vols = [self._volume(n) for n in volumes]
            for v in vols:
                limit = v.row["max_snapshots"]
                if len(v.snapshots) >= limit:
                    raise MaxSnapshots(
                        f"volume {v.name} has {limit} snapshots, its limit: delete some, or "
                        f"raise it with: shadowblk volume set {v.name} --max-snapshots N"
                    )
            started = time.perf_counter()
            deadline = time.monotonic() + hold_timeout
            # the lock may be held by a slow write-back of the overlay: bounded too
            if not self._cond.acquire(timeout=hold_timeout):
                raise HoldTimeout(_over_hold("writes could not be held", hold_timeout))
            try:
                for v in vols:
                    v.held += 1
            finally:
                self._cond.release()
            phases = {"hold": _ms_since(started)}
            snaps: list[Snapshot] = []
            try:
                attrs = {"auto_release": True} if auto_release else {}
                snaps = self._commit_set(vols, label, deadline, attrs, phases)
            except HoldTimeout as exc:
                raise HoldTimeout(_over_hold(exc.message, hold_timeout)) from None
            finally:
                with self._cond:  # one taking of the lock: it is contended by the I/O path
                    for v, s in zip(vols, snaps, strict=False):  # committed: the new epochs
                        v.epoch, v.next_seq = s.epoch, s.seq + 1
                        v.done = BitMap64()
                        v.add_snapshot(s)
                    for v in vols:
                        v.held -= 1
                    self._cond.notify_all()
                    self._wake_waiters()
                    if snaps:  # statistics() copies the history under the lock
                        phases["total"] = _ms_since(started)
                        self._create_phases.append(phases)
            # new snapshots: nothing preserved for them yet, no index scan
            return [_snapshot_info(s, 0) for s in snaps]

    def _commit_set(
        self,
        vols: list[CowVolume],
        label: str | None,
        deadline: float,
        attrs: dict[str, Any],
        phases: dict[str, float],
    ) -> list[Snapshot]:
        """Writes held: drain what the journal does not hold, sync, commit (the caller then
        opens the new epochs and releases the hold); `phases` gets each step's time in ms.

        The origins' sync (their journals') runs in a helper thread while this one waits
        for the catalog (a preserve batch's commit, often) and writes the rows; COMMIT
        only once the sync is done, so a committed snapshot never lacks a write
        acknowledged before it. A sync that must checkpoint runs first, on its own: it
        may wait for pinned overlays, whose preserves need the catalog."""
        step = time.perf_counter()
        self._drain(vols, deadline, unjournaled=True)
        phases["drain"], step = _ms_since(step), time.perf_counter()
        synced: Future[float] = Future()
        if any(v.origin.needs_checkpoint() for v in vols):
            synced.set_result(_sync_origins(vols, deadline))
            step = time.perf_counter()
        else:
            synced = self._syncers.submit(_sync_origins, vols, deadline)
        set_id, created = str(uuid.uuid4()), utc_now()
        snaps = [
            Snapshot(
                str(uuid.uuid4()),
                v.name,
                v.next_seq,
                v.epoch + 1,
                set_id,
                created,
                "ok",
                label,
                dict(attrs),
            )  # fmt: skip
            for v in vols
        ]
        with self.catalog.transaction() as t:
            t.execute(
                "INSERT INTO snapsets (id, created, label) VALUES (?,?,?)", (set_id, created, label)
            )
            for v, s in zip(vols, snaps, strict=True):
                t.execute(
                    "INSERT INTO snapshots (id, volume_id, seq, epoch, set_id, created, state, "
                    "label, attrs) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        s.id,
                        v.id,
                        s.seq,
                        s.epoch,
                        set_id,
                        created,
                        s.state,
                        label,
                        json.dumps(attrs),
                    ),  # fmt: skip
                )
                t.execute(
                    "UPDATE volumes SET epoch=?, next_seq=? WHERE id=?", (s.epoch, s.seq + 1, v.id)
                )
            phases["catalog"] = _ms_since(step)
            try:
                phases["sync"] = synced.result(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                if synced.done():  # the sync's own error (an fdatasync's ETIMEDOUT), not ours
                    raise
                raise HoldTimeout("writes could not be flushed") from None
            if time.monotonic() > deadline:
                raise HoldTimeout("writes could not be flushed")
            step = time.perf_counter()
            faults.hit("snapshot.commit")
        faults.hit("snapshot.committed")
        phases["commit"] = _ms_since(step)
        return snaps

    def _drain(
        self, vols: list[CowVolume], deadline: float | None, unjournaled: bool = False
    ) -> None:
        """Wait until no preserve of `vols` is pending (their overlays are on the origin);
        `unjournaled`: none whose overlay the journal does not hold entirely."""
        with self._cond:
            while any(_draining(v, unjournaled) for v in vols):
                stuck = _stuck(vols, unjournaled)
                if stuck is not None:  # retried every second; nobody waits for it here
                    raise stuck
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise HoldTimeout("pending writes did not drain")
                self._cond.wait(remaining)

    def delete_snapshot(self, name: str, *, force: bool = False, invalidate: bool = False) -> None:
        """Delete one snapshot (any, not only the oldest) and reclaim what only it needed.
        `invalidate`: reclaim the same, but keep it listed as `invalid` (the invalidate
        policy); deleting an invalid snapshot removes it from the list."""
        with self._admin:
            vol, snap = self._find_snapshot(name)
            if vol.invalid.get(snap.seq) is snap:
                if not invalidate:
                    self._forget(snap)
                    with self._lock:
                        del vol.invalid[snap.seq]
                return
            if snap.pins and not force:
                raise Busy(f"snapshot {name} is in use ({snap.pins} open export(s))")
            # 1. the snapshot goes (or turns invalid) durably first: until then it stays in
            # the model, so writes keep preserving what it reads. Dropping it from memory
            # first would let a write overwrite, unpreserved, a chunk that the snapshot
            # still on disk needs, and a crash right then would bring it back changed.
            self._forget(snap, invalidate)
            # 2. then out of the model, and what only it needed is freed (a crash from here
            # leaves unneeded entries, which recovery frees at the next open)
            with self._lock:
                vol.drop_snapshot(snap)
                freed = [
                    (c, e) for c, e in vol.entries_read_by(snap.epoch) if not _needed(vol, c, e)
                ]
                for chunk, entry in freed:
                    vol.remove_entry(chunk, entry)
                if invalidate:
                    snap.state = "invalid"
                    vol.invalid[snap.seq] = snap
            self._free(vol, freed)

    def _forget(self, snap: Snapshot, invalidate: bool = False) -> None:
        """Commit a snapshot's deletion (or, `invalidate`, its invalid state)."""
        faults.hit("delete.forget")
        with self.catalog.transaction() as t:
            if invalidate:
                t.execute("UPDATE snapshots SET state='invalid' WHERE id=?", (snap.id,))
            else:
                t.execute("DELETE FROM snapshots WHERE id=?", (snap.id,))
                t.execute(
                    "DELETE FROM snapsets WHERE id=? AND id NOT IN (SELECT set_id FROM snapshots)",
                    (snap.set_id,),
                )

    def _free(self, vol: CowVolume, freed: list[tuple[int, Entry]]) -> None:
        """Commit the removal of entries, then punch and release their slots."""
        faults.hit("delete.commit")
        with self.catalog.transaction() as t:
            t.executemany(
                "DELETE FROM chunks WHERE volume_id=? AND chunk=? AND epoch=?",
                [(vol.id, c, e[0]) for c, e in freed],
            )
        slots = [e[1] for _c, e in freed if e[1] != ZERO]
        faults.hit("delete.punch")
        vol.diff.punch(slots)
        faults.hit("delete.release")
        with self._lock:
            vol.diff.release(slots)

    def snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        with self._lock:
            vols = [self._volume(volume)] if volume else list(self._volumes.values())
            infos = []
            for v in vols:
                unique = v.diff_bytes_by_epoch()
                infos += [_snapshot_info(s, unique.get(s.epoch, 0)) for s in v.snapshots.values()]
                infos += [_snapshot_info(s, 0) for s in v.invalid.values()]
            return sorted(infos, key=lambda i: (i.volume, i.seq))

    def _find_snapshot(self, name: str) -> tuple[CowVolume, Snapshot]:
        vname, sep, seq = name.rpartition("@")
        if not sep or not seq.isdigit():
            raise InvalidArgument(f"{name!r} is not a snapshot name (VOLUME@N)")
        vol = self._volume(vname)
        snap = vol.snapshots.get(int(seq)) or vol.invalid.get(int(seq))
        if snap is None:
            raise NotFound(f"no snapshot {name}")
        return vol, snap

    # --- verify --------------------------------------------------------------------------

    def verify(
        self, name: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Re-read every preserved chunk (of volume or snapshot `name`, default all) and
        check each 4 KiB block against its checksum. Damaged chunks mark the snapshots that
        read them `damaged` (as a read would). Returns {"checked": N, "damaged": [{"volume",
        "chunk", "offset", "epoch", "snapshots": [names]}]}. `progress(done, total)` is
        called as it goes (from this thread). Each chunk is read under the engine lock on
        its own, so I/O goes on meanwhile; an entry freed meanwhile is skipped."""
        with self._lock:
            work: list[tuple[CowVolume, list[tuple[int, Entry]]]] = []
            if name is not None and "@" in name:
                vol, snap = self._find_snapshot(name)
                work.append((vol, vol.entries_read_by(snap.epoch)))
            else:
                vols = [self._volume(name)] if name is not None else list(self._volumes.values())
                for vol in vols:
                    work.append((vol, [(c, e) for c, es in vol.index.items() for e in es]))
            work = [(v, [(c, e) for c, e in items if e[1] != ZERO]) for v, items in work]
        total = sum(len(items) for _, items in work)
        checked, damaged = 0, []
        for vol, items in work:
            for chunk, entry in items:
                with self._lock:
                    entries = vol.index.get(chunk, [])
                    if entry in entries and vol.snapshots:
                        assert entry[2] is not None
                        try:
                            vol.diff.read(entry[1], vol.chunk_len(chunk), entry[2])
                        except DamagedData as e:
                            damaged.append(self._mark_damaged(vol, chunk, entry, e.message))
                        checked += 1
                if progress is not None:
                    progress(checked, total)
        return {"checked": checked, "damaged": damaged}

    def _damaged(self, snap: Snapshot, why: str) -> None:
        """A read or a verify met damage that `snap` reads: log it, mark it (durably, by
        the preserver thread: this runs under the engine lock)."""
        log.error("snapshot %s: %s", snap.name, why)
        if snap.state == "ok":
            snap.state = "damaged"
            self._preserver.record_state_nowait(snap.id, "damaged")

    def _mark_damaged(self, vol: CowVolume, chunk: int, entry: Entry, why: str) -> dict[str, Any]:
        """Mark the snapshots that read `entry` damaged; the record verify reports."""
        entries = vol.index[chunk]
        i = entries.index(entry)
        after = entries[i - 1][0] if i else -1
        readers = [s for s in vol.snapshots.values() if after < s.epoch <= entry[0]]
        for snap in readers:
            self._damaged(snap, f"chunk {chunk}: {why}")
        return {
            "volume": vol.name,
            "chunk": chunk,
            "offset": chunk * vol.chunk_size,
            "epoch": entry[0],
            "snapshots": [s.name for s in readers],
        }

    # --- exports -------------------------------------------------------------------------

    def export_names(self) -> list[tuple[str, str]]:
        with self._lock:
            names = [
                (v.name, f"volume {v.name} (read-write origin)") for v in self._volumes.values()
            ]
            for v in self._volumes.values():
                names += [
                    (s.name, f"snapshot of {v.name}, {s.created}")
                    for s in v.snapshots.values()
                    if s.state != "invalid"
                ]
            return names

    def open_export(self, name: str) -> OriginDevice | SnapshotDevice:
        """The device behind export `VOLUME` or `VOLUME@N` (pins a snapshot until closed)."""
        with self._lock:
            if "@" in name:
                vol, snap = self._find_snapshot(name)
                snap.pins += 1
                device: OriginDevice | SnapshotDevice = SnapshotDevice(self, vol, snap)
            else:
                vol = self._volume(name)
                if vol.reverting:
                    raise Busy(f"volume {name} is being reverted")
                device = OriginDevice(self, vol)
                vol.origin_opens += 1
            self._exports[vol.name] = self._exports.get(vol.name, 0) + 1
            return device

    def release_export(self, vol: CowVolume, snap: Snapshot | None) -> None:
        with self._lock:
            self._exports[vol.name] -= 1
            if snap is not None:
                snap.pins -= 1
            else:
                vol.origin_opens -= 1

    # --- the data path -------------------------------------------------------------------

    def read_origin(self, vol: CowVolume, offset: int, length: int) -> bytes | bytearray:
        _check_range(vol, offset, length)
        self._gate.pass_through()
        with self._lock:
            return vol.read_origin(offset, length)

    def read_snapshot(
        self, vol: CowVolume, snap: Snapshot, offset: int, length: int
    ) -> bytes | bytearray:
        _check_range(vol, offset, length)
        self._gate.pass_through()
        with self._lock:
            if vol.snapshots.get(snap.seq) is not snap or snap.state == "invalid":
                self._check_live(vol, snap)  # raises, saying which
            try:
                small = vol.read_snapshot_small(snap.epoch, offset, length)
                if small is not None:
                    return small
                reads = Gather(vol.diff)
                read_diff = partial(_read_diff, vol, reads)
                data = vol.read_snapshot(snap.epoch, offset, length, read_diff)
                reads.finish()
                return data
            except DamagedData as e:
                self._damaged(snap, e.message)
                raise

    def _check_live(self, vol: CowVolume, snap: Snapshot) -> None:
        """Refuse a deleted or invalid snapshot. One listed in `vol.invalid` is never in
        `vol.snapshots`; one a failed preserve invalidated is, with its state "invalid"
        (what `read_snapshot` tests before calling this)."""
        if vol.invalid.get(snap.seq) is snap:
            raise DamagedData(f"snapshot {snap.name} is invalid")
        if vol.snapshots.get(snap.seq) is not snap:
            raise NotFound(f"snapshot {snap.name} was deleted")
        if snap.state == "invalid":
            raise DamagedData(f"snapshot {snap.name} is invalid")

    def write_nowait(
        self, vol: CowVolume, offset: int, data: bytes | bytearray | memoryview
    ) -> bool:
        return self._apply_nowait(vol, offset, len(data), data, False)

    def write(self, vol: CowVolume, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Apply a write, waiting out holds and backpressure, making room in a full diff area
        by the volume's policy (or raising `InsufficientStorage` under fail-writes)."""
        _check_range(vol, offset, len(data))
        self._apply(vol, offset, len(data), data, False)

    def zero_nowait(self, vol: CowVolume, offset: int, length: int, punch: bool) -> bool:
        if length > ZERO_BATCH:
            _check_range(vol, offset, length)
            return False
        return self._apply_nowait(vol, offset, length, None, punch)

    def zero(
        self, vol: CowVolume, offset: int, length: int, punch: bool, fast: bool = False
    ) -> None:
        """Zero a range in batches of at most ZERO_BATCH bytes, each preserved first where
        snapshots need it (as zero entries where the old contents were zeroes)."""
        _check_range(vol, offset, length)
        if fast:
            with self._lock:
                if vol.held or vol.behind(offset, length) or vol.new_preserves(offset, length):
                    raise NotSupported("a fast zero is not possible: chunks must be preserved")
        end = offset + length
        for pos in range(offset, end, ZERO_BATCH):
            self._apply(vol, pos, min(ZERO_BATCH, end - pos), None, punch)

    def _apply_nowait(
        self, vol: CowVolume, offset: int, length: int, data: Buffer | None, punch: bool
    ) -> bool:
        _check_range(vol, offset, length)
        self._gate.pass_through()
        with self._lock:
            if vol.row["full_policy"] == "fail-writes" and vol.new_preserves(offset, length):
                return False  # under fail-writes nothing that needs a preserve is acked early
            return self._try_apply(vol, offset, length, data, punch) == APPLIED

    def _apply(
        self, vol: CowVolume, offset: int, length: int, data: Buffer | None, punch: bool
    ) -> None:
        while True:
            with self._cond:
                while (status := self._try_apply(vol, offset, length, data, punch)) == WAIT:
                    self._cond.wait()
                seq = self._preserver.queued_seq
            if status == APPLIED:
                break
            self._make_room(vol)
        if vol.row["full_policy"] == "fail-writes":
            with self._cond:
                self._preserver.wait_applied(seq)

    def wait_writable(
        self, vol: CowVolume, offset: int, length: int, notify: Callable[[], None]
    ) -> bool:
        """For a write `write_nowait` refused: True if it waits only for what ends by
        itself (a snapshot's hold, the preserve of an earlier epoch, room in the overlay);
        `notify()` is then called once, from any thread, when that may have changed: try
        `write_nowait` again. False: try it again now, or call `write` in a thread. (The
        NBD server waits so in a task: no worker thread per held write.)"""
        _check_range(vol, offset, length)
        with self._lock:
            if vol.row["full_policy"] == "fail-writes" and vol.new_preserves(offset, length):
                return False
            if self._must_wait(vol, offset, length) is not None:
                return False
            self._waiters.append(notify)
            return True

    def _wake_waiters(self) -> None:
        """Writes waiting in `wait_writable` may go ahead now (lock held)."""
        waiters, self._waiters = self._waiters, []
        for notify in waiters:
            with contextlib.suppress(Exception):  # its event loop is gone: nobody waits
                notify()

    def _must_wait(self, vol: CowVolume, offset: int, length: int) -> int | None:
        """None if the write must wait (held, behind, overlay full); else how many chunks
        it would start preserving. Lock held."""
        if vol.held or vol.behind(offset, length):
            return None
        n = vol.new_preserves(offset, length) if vol.live_epochs else 0
        overlay = self._preserver.overlay_bytes
        if n and overlay and overlay + n * vol.chunk_size > OVERLAY_CAP:
            return None
        return n

    def _try_apply(
        self, vol: CowVolume, offset: int, length: int, data: Buffer | None, punch: bool
    ) -> str:
        """Apply a write or zero unless writes are held, the overlay has no room (WAIT) or
        the diff area has no room for its preserves (FULL). Lock held."""
        n = self._must_wait(vol, offset, length)
        if n is None:
            return WAIT
        if n and not self._has_room(vol, n * vol.chunk_size):
            return FULL
        vol.apply_write(offset, length, data, self._start_preserve, punch)
        self.stats["writes"] += 1
        return APPLIED

    def cache(self, vol: CowVolume, offset: int, length: int) -> None:
        _check_range(vol, offset, length)
        vol.origin.advise_willneed(offset, length)

    def allocation(
        self, vol: CowVolume, snap: Snapshot | None, offset: int, length: int
    ) -> list[tuple[int, int]]:
        """`base:allocation` runs of the origin (snap None) or of a snapshot."""
        _check_range(vol, offset, length)
        end = offset + max(length, 1)
        with self._lock:
            if snap is None:
                return extents.origin_allocation(vol, offset, end)
            self._check_live(vol, snap)
            return extents.snapshot_allocation(vol, snap.epoch, offset, end)

    def dirty_extents(
        self, vol: CowVolume, snap: Snapshot | None, since: str, offset: int, length: int
    ) -> list[tuple[int, int]]:
        """Chunks that differ between the origin (snap None) or `snap`, and snapshot `since`."""
        _check_range(vol, offset, length)
        end = offset + max(length, 1)
        with self._lock:
            base_vol, base = self._find_snapshot(since)
            if base_vol is not vol:
                raise InvalidArgument(f"{since} is not a snapshot of volume {vol.name}")
            if snap is None:
                return extents.dirty(vol, base.epoch, None, offset, end)
            self._check_live(vol, snap)
            lo, hi = sorted((base.epoch, snap.epoch))
            return extents.dirty(vol, lo, hi, offset, end)

    def dirty_bitmaps(self, vol: CowVolume) -> list[str]:
        with self._lock:
            return [s.name for s in vol.snapshots.values() if s.state != "invalid"]

    def _has_room(self, vol: CowVolume, need: int) -> bool:
        """Can the diff area take `need` more bytes? (the reservation made before an ack)"""
        used = vol.diff.used_bytes()
        limit = vol.row["max_diff"]
        if limit is not None:
            if used + need > limit:
                return False
            if used + need > limit * 0.9 and not vol.warned:
                vol.warned = True
                log.warning("volume %s: diff area above 90%% of its %d-byte limit", vol.name, limit)
        st = os.statvfs(vol.diff.path)
        floor = st.f_blocks * st.f_frsize // 20  # keep 5 % of the filesystem free
        return st.f_bavail * st.f_frsize - self._preserver.overlay_bytes - need >= floor

    def _make_room(self, vol: CowVolume) -> None:
        """The diff area is full: apply the volume's full policy (blocking)."""
        policy = vol.row["full_policy"]
        with self._lock:
            snaps = sorted(vol.snapshots.values(), key=lambda s: s.seq)
        if policy == "fail-writes" or not snaps:
            raise InsufficientStorage(
                f"the diff area of volume {vol.name} is full (policy {policy})"
            )
        if policy == "invalidate":
            victims = snaps
        else:  # delete-oldest: the oldest not in use, or the oldest if all are
            victims = [next((s for s in snaps if not s.pins), snaps[0])]
        invalidate = policy == "invalidate"
        for snap in victims:
            what = "invalidating" if invalidate else "deleting"
            log.warning("volume %s: diff area full: %s %s (%s)", vol.name, what, snap.name, policy)
            with contextlib.suppress(NotFound):  # deleted meanwhile: room was made anyway
                self.delete_snapshot(snap.name, force=True, invalidate=invalidate)
                vol.policy_victims += 1
        vol.warned = False

    def _start_preserve(self, vol: CowVolume, chunk: int) -> Pending:
        """Read a chunk's current contents and queue their preserve (lock held). A hole
        is not read: a zero entry, with no page cache filled with zeroes to compare (the
        first writes to a sparse volume after a snapshot)."""
        base, length = chunk * vol.chunk_size, vol.chunk_len(chunk)
        if vol.origin.is_hole(base, length):
            return self._preserver.queue_nowait(vol, chunk, zeroes(length), ZERO)
        old = vol.origin.pread(base, length)
        slot = ZERO if old == zeroes(len(old)) else vol.diff.allocate()
        return self._preserver.queue_nowait(vol, chunk, old, slot)

    def flush(self, vol: CowVolume | None = None) -> None:
        """Every write applied before this call is durable when it returns (I2): in the
        journal (overlays included), or on the origin for the preserves whose overlays the
        journal does not hold entirely (waited for)."""
        with self._cond:
            vols = [vol] if vol is not None else list(self._volumes.values())
            seq = max(
                (p.seq for v in vols for p in v.pending.values() if not p.journaled), default=0
            )
            self._preserver.wait_applied(seq)
        for v in vols:
            faults.hit("flush.sync")
            v.origin.sync()
        with self._lock:
            self.stats["flushes"] += 1
            failed = [(v, v.origin_error) for v in vols if v.origin_error is not None]
            for v, _ in failed:
                v.origin_error = None
            unsafe = _stuck(vols, unjournaled=True)
        for v, error in failed:  # reported once, as a disk reports a failed writeback
            log.error(
                "volume %s: an acknowledged write did not reach the origin: %s", v.name, error
            )
            raise OSError(
                error.errno or errno.EIO,
                f"a write acknowledged earlier could not be written to the origin: {error}",
            )
        if unsafe is not None:  # not durable anywhere until its write-back works
            raise unsafe

    def settle(self) -> None:
        """Wait until every preserve queued before this call is applied: its entry indexed,
        its overlay on the origin. (`flush` need not wait for the preserves whose overlays
        the journal holds; whoever reads the index or the origin file itself may.)"""
        with self._cond:
            self._preserver.wait_applied(self._preserver.queued_seq)

    # --- statistics ----------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            volumes = {
                v.name: {
                    "snapshots": len(v.snapshots),
                    "changed_chunks": len(v.index),
                    "entries": sum(len(e) for e in v.index.values()),
                    "diff_bytes": v.diff.used_bytes(),
                    "pending": len(v.pending),
                    "epoch": v.epoch,
                }
                for v in self._volumes.values()
            }
            return dict(
                self.stats,
                overlay_bytes=self._preserver.overlay_bytes,
                volumes=volumes,
                unavailable=dict(self.unavailable),
                exports=dict(self._exports),
                create_phases_ms=list(self._create_phases),
            )


VOLUME_COLUMNS = {
    "id", "name", "uuid", "size", "chunk_size", "origin", "origin_kind", "owned", "diff_area",
    "max_diff", "full_policy", "sparse", "epoch", "next_seq", "created", "legacy_checksums",
    "max_snapshots", "revert_epoch",
}  # fmt: skip


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _over_hold(what: str, limit: float) -> str:
    return (
        f"{what} within the hold limit of {limit:g} s: the origin or the diff area is too "
        "slow (the service's --hold-timeout sets the limit)"
    )


def _entry_fits(
    vol: CowVolume, chunk: int, epoch: int, slot: int | None, digest: Any, legacy: bool
) -> bool:
    """Can this catalog entry be right? Its chunk in the volume, its epoch one the volume
    has had, its slot in the diff file, a checksum of the right size with it."""
    if not (isinstance(chunk, int) and 0 <= chunk * vol.chunk_size < vol.size):
        return False
    if not (isinstance(epoch, int) and 1 <= epoch <= vol.epoch):
        return False
    if slot is None:
        return digest is None
    if not (isinstance(slot, int) and 0 <= slot < vol.diff.hwm and isinstance(digest, bytes)):
        return False
    return legacy or len(digest) == 8 * -(-vol.chunk_len(chunk) // 4096)


def _snapshot_info(s: Snapshot, diff_bytes: int) -> SnapshotInfo:
    return SnapshotInfo(
        name=s.name,
        id=s.id,
        volume=s.volume,
        seq=s.seq,
        set=s.set_id,
        created=s.created,
        epoch=s.epoch,
        state=s.state,
        label=s.label,
        diff_bytes=diff_bytes,
        attrs=dict(s.attrs),
    )


def _read_diff(
    vol: CowVolume, reads: Gather, chunk: int, entry: Entry, start: int, stop: int, out: memoryview
) -> None:
    """Bytes [start, stop) of a preserved chunk into `out`: at once for a zero entry, at
    `reads.finish()` for data (checked there)."""
    if entry[1] == ZERO:
        out[:] = memoryview(zeroes(vol.chunk_len(chunk)))[start:stop]
        return
    assert entry[2] is not None
    reads.add(entry[1], vol.chunk_len(chunk), entry[2], start, stop, out, chunk)


def _sync_origins(vols: list[CowVolume], deadline: float) -> float:
    """Make every write to `vols` durable (Origin.sync); returns the time it took, in ms."""
    start = time.perf_counter()
    for v in vols:
        faults.hit("snapshot.sync")
        try:
            v.origin.sync(deadline)
        except CheckpointWait:  # pinned overlays not on the origin within the hold limit
            raise HoldTimeout("writes could not be flushed") from None
    return _ms_since(start)


def _stuck(vols: list[CowVolume], unjournaled: bool) -> OSError | None:
    """The error for a preserve of `vols` (`unjournaled`: one the journal does not hold
    entirely) whose write-back the origin refused, if any (lock held)."""
    for v in vols:
        for p in v.pending.values():
            if p.stuck is not None and not (unjournaled and p.journaled):
                return OSError(
                    p.stuck.errno or errno.EIO,
                    f"volume {v.name}: an acknowledged write is not on the origin yet, which "
                    f"refused it ({p.stuck}); it is kept in memory and tried again",
                )
    return None


def _draining(vol: CowVolume, unjournaled: bool) -> bool:
    """Has `vol` a pending preserve to wait for? (lock held)"""
    if not unjournaled:
        return bool(vol.pending)
    return any(not p.journaled for p in vol.pending.values())


def _paint_record(record: Record, chunks: list[int], images: dict[int, bytearray], cs: int) -> None:
    """Apply a journal record to the images of `chunks` (sorted) it touches."""
    if not record.length:
        return
    end = record.offset + record.length
    lo = bisect_left(chunks, record.offset // cs)
    hi = bisect_right(chunks, (end - 1) // cs)
    for chunk in chunks[lo:hi]:
        image, base = images[chunk], chunk * cs
        a, b = max(record.offset, base), min(end, base + len(image))
        if record.kind == J_DATA:
            assert record.data is not None
            image[a - base : b - base] = record.data[a - record.offset : b - record.offset]
        else:
            image[a - base : b - base] = zeroes(b - a)


def _needed(vol: CowVolume, chunk: int, entry: Entry) -> bool:
    entries = vol.index[chunk]
    return vol.entry_needed(entries, entries.index(entry))


def _check_range(vol: CowVolume, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > vol.size:
        raise OutOfRange(f"range {offset}+{length} is outside volume {vol.name} ({vol.size} bytes)")


def _snapshot_from_row(row: Any, volume: str) -> Snapshot:
    return Snapshot(
        row["id"],
        volume,
        row["seq"],
        row["epoch"],
        row["set_id"],
        row["created"],
        row["state"],
        row["label"],
        json.loads(row["attrs"]),
    )
