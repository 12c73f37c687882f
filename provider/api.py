"""The engine's interface to its front-ends and to the service.

Front-ends (the trio NBD server, the nbdkit plugin, FUSE) are protocol adapters only: they
translate offsets in and bytes or errors out, through `BlockDevice`. The service and the
control plane use `Engine` (provider/engine.py) through the methods listed in `EngineAPI`.

Threading: every method here is synchronous and thread-safe. Methods named `*_nowait`
never block and are safe to call from a trio thread; the others may block (fsync, waiting
for the copy-on-write overlay to drain, a snapshot hold) and must be called from a worker
thread (`trio.to_thread.run_sync`) by async callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

SNAPSHOT_SEPARATOR = "@"
HOLD_TIMEOUT = 10.0  # seconds snapshot creation may hold writes, at most (DESIGN.md)


@dataclass(frozen=True)
class SnapshotInfo:
    name: str  # "VOLUME@N"
    id: str  # UUID
    volume: str
    seq: int
    set: str  # UUID of its snapshot set
    created: str  # ISO 8601, UTC
    epoch: int
    state: str  # "ok", "damaged", "invalid"
    label: str | None = None
    diff_bytes: int = 0  # bytes of diff-area data only this snapshot needs
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    uuid: str
    size: int
    chunk_size: int
    origin: str
    origin_kind: str  # "file" or "block"
    diff_area: str
    max_diff: int | None
    full_policy: str
    max_snapshots: int
    policy_victims: int  # snapshots its full policy deleted or invalidated since the start
    sparse: bool
    snapshots: int
    diff_bytes: int  # allocated bytes of preserved data
    created: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlockDevice(Protocol):
    """One export: a volume's origin (read-write) or a snapshot (read-only).

    Errors are `shadowblk.provider.errors.ShadowblkError` subclasses: `OutOfRange` for a
    request past the end, `ReadOnly` for a write to a snapshot, `DamagedData` for a diff-area
    chunk that fails its checksum, `InsufficientStorage` when the diff area is full under the
    `fail-writes` policy.
    """

    name: str
    size: int
    readonly: bool
    chunk_size: int

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        """Read; never blocks for long (page-cache I/O and in-memory look-ups)."""
        ...

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        """Apply a write if that can be done without blocking.

        True: the write is applied (visible to every later read on every connection) and may
        be acknowledged; it is durable after the next `flush`. False: nothing was done; call
        `write` from a worker thread (the overlay is full or writes are held for a snapshot).
        """
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Apply a write, blocking while the overlay is full or writes are held."""
        ...

    def wait_writable(self, offset: int, length: int, notify: Callable[[], None]) -> bool:
        """After `write_nowait` said False: True if the write waits only for something that
        ends by itself (a snapshot's hold, overlay room); `notify()` is called once, from
        any thread, when it may go ahead: call `write_nowait` again. False: call
        `write_nowait` again now, or `write` from a worker thread."""
        ...

    def flush(self) -> None:
        """Make every write applied before this call durable (blocking)."""
        ...

    def zero_nowait(self, offset: int, length: int, *, punch: bool) -> bool:
        """Make a range read as zeroes (TRIM, WRITE_ZEROES) if that can be done without
        blocking; False: nothing was done, call `zero`. `punch`: the range may be
        deallocated (TRIM, or WRITE_ZEROES without NO_HOLE on a sparse volume); a fully
        allocated volume stays allocated whatever `punch` says. Chunks that snapshots need
        are preserved first, as zero entries where they read as zeroes."""
        ...

    def zero(self, offset: int, length: int, *, punch: bool, fast: bool = False) -> None:
        """Blocking `zero_nowait`, in bounded batches for large ranges. `fast`: raise
        `NotSupported` (ENOTSUP) instead of preserving anything (NBD's FAST_ZERO)."""
        ...

    def cache(self, offset: int, length: int) -> None:
        """A hint that the range will be read soon (NBD_CMD_CACHE); never fails on range."""
        ...

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """`base:allocation` of [offset, offset+length): consecutive (length, flags) runs
        covering at least one byte and at most the range, flags a sum of EXTENT_HOLE (1)
        and EXTENT_ZERO (2). Never blocks for long."""
        ...

    def dirty_bitmaps(self) -> list[str]:
        """The snapshots this export can be compared with: names `VOLUME@N`."""
        ...

    def dirty_extents(self, since: str, offset: int, length: int) -> list[tuple[int, int]]:
        """`qemu:dirty-bitmap:since`: (length, 1) runs for chunks that differ between this
        export and snapshot `since`, (length, 0) runs for chunks that do not; whole chunks,
        clipped to the range; raises `NotFound` if `since` is gone."""
        ...

    def close(self) -> None:
        """Release the export (unpins a snapshot)."""
        ...


EXTENT_HOLE = 1
EXTENT_ZERO = 2


class ExportRegistry(Protocol):
    """What a front-end needs to find its exports."""

    def export_names(self) -> list[tuple[str, str]]:
        """(name, description) of every export: each volume, then each live snapshot."""
        ...

    def open_export(self, name: str) -> BlockDevice:
        """The device for `VOLUME` or `VOLUME@N`; raises `NotFound`."""
        ...


class EngineAPI(ExportRegistry, Protocol):
    """What the service and control plane call (all blocking; run in a worker thread)."""

    def create_volume(
        self,
        name: str,
        *,
        size: int | None = None,
        backing: str | None = None,
        chunk_size: int = 65536,
        diff_area: str | None = None,
        max_diff: int | None = None,
        full_policy: str = "delete-oldest",
        sparse: bool = False,
    ) -> VolumeInfo: ...

    def remove_volume(self, name: str) -> None: ...

    def set_volume(
        self,
        name: str,
        *,
        max_diff: int | str | None = None,
        no_max_diff: bool = False,
        full_policy: str | None = None,
        max_snapshots: int | None = None,
    ) -> VolumeInfo: ...

    def volumes(self) -> list[VolumeInfo]: ...

    unavailable: dict[str, str]  # volumes that could not be opened: name -> why

    def create_snapshot_set(
        self,
        volumes: list[str],
        *,
        label: str | None = None,
        hold_timeout: float = HOLD_TIMEOUT,
        auto_release: bool = False,
    ) -> list[SnapshotInfo]: ...

    def delete_snapshot(self, name: str, *, force: bool = False) -> None:
        """Delete a snapshot; a pinned one (open export, mount, backup) only with `force`."""
        ...

    def snapshots(self, volume: str | None = None) -> list[SnapshotInfo]: ...

    def revert(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Roll a volume back to snapshot `name` (see Engine.revert)."""
        ...

    def statistics(self) -> dict[str, Any]: ...

    def verify(
        self, name: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Re-check preserved data: {"checked": N, "damaged": [...]} (see Engine.verify)."""
        ...

    def close(self) -> None: ...
