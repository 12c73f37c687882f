"""An in-memory fake of the engine's front-end API (provider/api.py), with test hooks.

Simple and correct rather than fast: bytes in a bytearray per export, a set of punched
chunks for `base:allocation` holes, zeroes and dirty chunks computed from the contents.
The hooks (durable contents, fault injection, held writes and zeroes, gated flushes, the
zero and cache calls made) are for tests that take the `fake` fixture.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

from shadowblk.provider.api import EXTENT_HOLE, EXTENT_ZERO, BlockDevice
from shadowblk.provider.errors import NotFound, NotSupported, OutOfRange, ReadOnly

MiB = 1024 * 1024
VOL_SIZE = 16 * MiB
CHUNK = 64 * 1024
TIMEOUT = 30.0  # failsafe for anything that would otherwise hang; never a pass condition


class FakeStore:
    """One export's bytes: `data` (what reads see) and `durable` (what a crash keeps);
    `holes`, the chunks punched (deallocated) since they were last written."""

    def __init__(self, data: bytearray, readonly: bool) -> None:
        self.data = data
        self.durable = bytearray(data)
        self.readonly = readonly
        self.lock = threading.Lock()
        self.holes: set[int] = set()
        self.hold_writes = False  # write_nowait says False: the server must call write()
        self.hold_zeroes = False  # zero_nowait says False: the server must call zero()
        self.fast_zero_unsupported = False  # zero(fast=True) raises NotSupported
        self.blocking_writes = 0
        self.blocking_zeroes: list[tuple[int, int, bool, bool]] = []  # offset, length, punch, fast
        self.inline_zeroes: list[tuple[int, int, bool]] = []  # offset, length, punch
        self.cached: list[tuple[int, int]] = []
        self.flushes = 0
        self.flush_gate: threading.Event | None = None
        self.faults: dict[str, BaseException] = {}

    def check(self, op: str, offset: int, length: int) -> None:
        fault = self.faults.get(op)
        if fault is not None:
            raise fault
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise OutOfRange(f"{offset}+{length} is past the end")

    def apply(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise ReadOnly("snapshots are read-only")
        self.check("write", offset, len(data))
        with self.lock:
            self.data[offset : offset + len(data)] = data
            self.holes -= set(_chunks(offset, len(data)))

    def zero(self, offset: int, length: int, punch: bool) -> None:
        if self.readonly:
            raise ReadOnly("snapshots are read-only")
        self.check("zero", offset, length)
        with self.lock:
            self.data[offset : offset + length] = bytes(length)
            touched = set(_chunks(offset, length))
            end = offset + length
            whole = {c for c in touched if offset <= c * CHUNK and (c + 1) * CHUNK <= end}
            self.holes = (self.holes - touched) | (whole if punch else set())

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Per chunk piece: HOLE if punched, ZERO if it reads as zeroes; merged."""
        self.check("extents", offset, length)
        runs: list[tuple[int, int]] = []
        with self.lock:
            for start, end in _pieces(offset, length):
                flags = EXTENT_HOLE if start // CHUNK in self.holes else 0
                if self.data[start:end] == bytes(end - start):
                    flags |= EXTENT_ZERO
                _append_run(runs, end - start, flags)
        return runs

    def flush(self) -> None:
        self.check("flush", 0, 0)
        if self.flush_gate is not None and not self.flush_gate.wait(TIMEOUT):
            raise TimeoutError("flush gate never opened")
        with self.lock:
            self.durable[:] = self.data
            self.flushes += 1


def _chunks(offset: int, length: int) -> range:
    return range(offset // CHUNK, (offset + length + CHUNK - 1) // CHUNK)


def _pieces(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """[start, end) of each chunk's part of the range."""
    for chunk in _chunks(offset, length):
        yield max(offset, chunk * CHUNK), min(offset + length, (chunk + 1) * CHUNK)


def _append_run(runs: list[tuple[int, int]], size: int, flags: int) -> None:
    if runs and runs[-1][1] == flags:
        runs[-1] = (runs[-1][0] + size, flags)
    else:
        runs.append((size, flags))


class FakeDevice:
    chunk_size = CHUNK

    def __init__(self, name: str, store: FakeStore, registry: FakeRegistry) -> None:
        self.name = name
        self.size = len(store.data)
        self.readonly = store.readonly
        self._store = store
        self._registry = registry
        self._closed = False

    def _live(self) -> FakeStore:
        if self._closed:
            raise RuntimeError(f"{self.name}: used after close")
        return self._store

    def pread(self, offset: int, length: int) -> bytes:
        store = self._live()
        store.check("read", offset, length)
        with store.lock:
            return bytes(store.data[offset : offset + length])

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        store = self._live()
        if store.hold_writes and not store.readonly:
            return False
        store.apply(offset, data)
        return True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        store = self._live()
        store.apply(offset, data)
        store.blocking_writes += 1

    def wait_writable(self, offset: int, length: int, notify: object) -> bool:
        return False  # a held write goes to `write`, in a thread

    def flush(self) -> None:
        self._live().flush()

    def zero_nowait(self, offset: int, length: int, *, punch: bool) -> bool:
        store = self._live()
        if store.hold_zeroes and not store.readonly:
            return False
        store.zero(offset, length, punch)
        store.inline_zeroes.append((offset, length, punch))
        return True

    def zero(self, offset: int, length: int, *, punch: bool, fast: bool = False) -> None:
        store = self._live()
        if fast and store.fast_zero_unsupported:
            raise NotSupported("chunks must be preserved first: not a fast zero")
        store.zero(offset, length, punch)
        store.blocking_zeroes.append((offset, length, punch, fast))

    def cache(self, offset: int, length: int) -> None:
        store = self._live()
        store.check("cache", 0, 0)
        store.cached.append((offset, length))

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return self._live().extents(offset, length)

    def dirty_bitmaps(self) -> list[str]:
        self._live()
        return [name for name in self._registry.stores if "@" in name]

    def dirty_extents(self, since: str, offset: int, length: int) -> list[tuple[int, int]]:
        """Chunks whose contents differ from snapshot `since` (1), or not (0)."""
        store = self._live()
        store.check("dirty", offset, length)
        other = self._registry.stores.get(since)
        if other is None or "@" not in since:
            raise NotFound(f"no snapshot {since!r}")
        runs: list[tuple[int, int]] = []
        for chunk in _chunks(offset, length):
            start, end = chunk * CHUNK, (chunk + 1) * CHUNK
            with store.lock:
                mine = bytes(store.data[start:end])
            with other.lock:
                dirty = mine != other.data[start:end]
            piece = min(end, offset + length) - max(start, offset)
            _append_run(runs, piece, int(dirty))
        return runs

    def close(self) -> None:
        self._live()
        self._closed = True
        self._registry.closed(self)


class FakeRegistry:
    def __init__(self) -> None:
        origin = bytearray(random.Random(1).randbytes(VOL_SIZE))
        self.stores = {
            "vol": FakeStore(origin, readonly=False),
            "vol@1": FakeStore(bytearray(origin), readonly=True),
        }
        self.descriptions = {"vol": "volume vol", "vol@1": "snapshot 1 of vol"}
        self.open_devices: list[FakeDevice] = []
        self._lock = threading.Lock()

    def export_names(self) -> list[tuple[str, str]]:
        return [(name, self.descriptions[name]) for name in self.stores]

    def open_export(self, name: str) -> BlockDevice:
        if name not in self.stores:
            raise NotFound(f"no export {name!r}")
        device = FakeDevice(name, self.stores[name], self)
        with self._lock:
            self.open_devices.append(device)
        return device

    def closed(self, device: FakeDevice) -> None:
        with self._lock:
            self.open_devices.remove(device)

    # Test hooks.

    def durable_pread(self, name: str, offset: int, length: int) -> bytes:
        store = self.stores[name]
        with store.lock:
            return bytes(store.durable[offset : offset + length])
