"""Recovery overlays: a temporary writable layer over a read-only snapshot.

A crash-consistent snapshot of a mounted ext4, xfs or btrfs has a dirty journal. The kernel
replays it only onto a writable device, and a snapshot must never change. An overlay is
that writable device: reads come from the snapshot, except the 4 KiB blocks written since
the overlay was made, which come from a private store. The store is an unnamed temporary
file (O_TMPFILE) under the state directory: it holds the replayed journal and nothing
else, is never visible, and disappears with its last descriptor, at release or when the
service dies. The snapshot's own bytes are never written.

Writes of partial blocks read the rest of the block from the snapshot first (the store
only ever holds whole blocks). The overlay is a `BlockDevice` like the others: the FUSE
front-end serves it as a hidden read-write file, `.VOLUME@N.recover-K`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pyroaring import BitMap64

from shadowblk.provider.api import BlockDevice
from shadowblk.provider.errors import OutOfRange
from shadowblk.provider.fileio import pread_full, pwrite_full

BLOCK = 4096
Buffer = bytes | bytearray | memoryview


class RecoveryOverlay:
    """A writable view of `base` (a snapshot device, which the overlay owns and closes)."""

    readonly = False

    def __init__(self, name: str, base: BlockDevice, store_dir: Path) -> None:
        self.name = name
        self.base = base
        self.size = base.size
        self.chunk_size = base.chunk_size
        store_dir.mkdir(mode=0o700, exist_ok=True)
        self._fd = os.open(store_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        self._written = BitMap64()  # blocks held by the store
        self._lock = threading.Lock()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"{offset}+{length} is past the end of {self.name} ({self.size})")

    def pread(self, offset: int, length: int) -> bytes | bytearray:
        self._check(offset, length)
        with self._lock:
            if not self._written:
                return self.base.pread(offset, length)
            parts: list[Buffer] = []
            pos, end = offset, offset + length
            while pos < end:
                block = pos // BLOCK
                mine = block in self._written
                run_end = pos
                while run_end < end and ((run_end // BLOCK) in self._written) == mine:
                    run_end = (run_end // BLOCK + 1) * BLOCK
                run_end = min(run_end, end)
                if mine:
                    parts.append(pread_full(self._fd, run_end - pos, pos))
                else:
                    parts.append(self.base.pread(pos, run_end - pos))
                pos = run_end
            return b"".join(parts)

    def write_nowait(self, offset: int, data: Buffer) -> bool:
        self.write(offset, data)
        return True

    def write(self, offset: int, data: Buffer) -> None:
        self._check(offset, len(data))
        if not data:
            return
        with self._lock:
            first, last = offset // BLOCK, (offset + len(data) - 1) // BLOCK
            for block in (first, last):  # whole blocks only: fill the edges once
                if block not in self._written:
                    start = block * BLOCK
                    fill = self.base.pread(start, min(BLOCK, self.size - start))
                    pwrite_full(self._fd, fill, start)
            pwrite_full(self._fd, data, offset)
            self._written.add_range(first, last + 1)

    def zero_nowait(self, offset: int, length: int, *, punch: bool) -> bool:
        self.zero(offset, length, punch=punch)
        return True

    def zero(self, offset: int, length: int, *, punch: bool, fast: bool = False) -> None:
        step = 1 << 20
        for pos in range(offset, offset + length, step):
            self.write(pos, bytes(min(step, offset + length - pos)))

    def flush(self) -> None:
        """Nothing to make durable: the overlay dies with the service by design."""

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        self.base.close()

    @property
    def bytes_held(self) -> int:
        return len(self._written) * BLOCK
