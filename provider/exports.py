"""The engine's devices: what front-ends read and write (see `BlockDevice` in api.py).

This is an adapter layer only: every call goes straight to the engine, which owns the
copy-on-write semantics, the locks and the range checks. A device is the origin when its
snapshot is None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ReadOnly

if TYPE_CHECKING:
    from .cow import CowVolume, Snapshot
    from .engine import Engine

Buffer = bytes | bytearray | memoryview


class _Device:
    """What origin and snapshot devices share: identity, maps, cache hints, release."""

    readonly: bool

    def __init__(self, engine: Engine, vol: CowVolume, snap: Snapshot | None) -> None:
        self._engine = engine
        self._vol = vol
        self._snap = snap
        self.name = vol.name if snap is None else snap.name
        self.size = vol.size
        self.chunk_size = vol.chunk_size
        self._closed = False

    def cache(self, offset: int, length: int) -> None:
        self._engine.cache(self._vol, offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._engine.allocation(self._vol, self._snap, offset, length)

    def dirty_bitmaps(self) -> list[str]:
        return self._engine.dirty_bitmaps(self._vol)

    def dirty_extents(self, since: str, offset: int, length: int) -> list[tuple[int, int]]:
        return self._engine.dirty_extents(self._vol, self._snap, since, offset, length)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine.release_export(self._vol, self._snap)


class OriginDevice(_Device):
    """A volume's origin, read-write, with copy-on-write for its snapshots."""

    readonly = False

    def __init__(self, engine: Engine, vol: CowVolume) -> None:
        super().__init__(engine, vol, None)

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        return self._engine.read_origin(self._vol, offset, length)

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        return self._engine.write_nowait(self._vol, offset, data)

    def write(self, offset: int, data: Buffer) -> None:
        self._engine.write(self._vol, offset, data)

    def wait_writable(self, offset: int, length: int, notify: Callable[[], None]) -> bool:
        return self._engine.wait_writable(self._vol, offset, length, notify)

    def flush(self) -> None:
        self._engine.flush(self._vol)

    def zero_nowait(self, offset: int, length: int, *, punch: bool) -> bool:
        return self._engine.zero_nowait(self._vol, offset, length, punch)

    def zero(self, offset: int, length: int, *, punch: bool, fast: bool = False) -> None:
        self._engine.zero(self._vol, offset, length, punch, fast)


class SnapshotDevice(_Device):
    """A snapshot, read-only; pinned (not deletable without --force) while open."""

    readonly = True

    def __init__(self, engine: Engine, vol: CowVolume, snap: Snapshot) -> None:
        super().__init__(engine, vol, snap)
        self._live = snap

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        return self._engine.read_snapshot(self._vol, self._live, offset, length)

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        raise ReadOnly(f"snapshot {self.name} is read-only")

    def write(self, offset: int, data: Buffer) -> None:
        raise ReadOnly(f"snapshot {self.name} is read-only")

    def wait_writable(self, offset: int, length: int, notify: Callable[[], None]) -> bool:
        raise ReadOnly(f"snapshot {self.name} is read-only")

    def flush(self) -> None:
        """Nothing to flush: a snapshot's bytes are durable from its creation."""

    def zero_nowait(self, offset: int, length: int, *, punch: bool) -> bool:
        raise ReadOnly(f"snapshot {self.name} is read-only")

    def zero(self, offset: int, length: int, *, punch: bool, fast: bool = False) -> None:
        raise ReadOnly(f"snapshot {self.name} is read-only")
