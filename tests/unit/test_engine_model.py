"""The engine against a reference model (hypothesis stateful testing).

The model is the obvious one: the origin is a bytearray, a snapshot is a frozen copy of it.
After every step every live snapshot and the origin read back through the engine's devices
must equal the model byte for byte, and the engine's fsck must find nothing.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from shadowblk.provider.api import EXTENT_ZERO
from shadowblk.provider.engine import Engine
from shadowblk.provider.fsck import check_consistency

VOLUMES = {"a": (200 * 1024 + 512, 4096), "b": (192 * 1024, 16384)}  # size, chunk size


class EngineModel(RuleBasedStateMachine):
    snapshots = Bundle("snapshots")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="shadowblk-model-")
        self.engine = Engine.open(self.dir)
        self.model: dict[str, bytearray] = {}
        for name, (size, chunk) in VOLUMES.items():
            self.engine.create_volume(name, size=size, chunk_size=chunk, sparse=name == "b")
            self.model[name] = bytearray(size)
        self.snaps: dict[str, bytes] = {}
        # per volume, in order: a snapshot's name, or the set of chunks one write touched
        self.history: dict[str, list[str | set[int]]] = {v: [] for v in VOLUMES}

    def teardown(self) -> None:
        self.engine.close()
        shutil.rmtree(self.dir)

    @rule(
        vol=st.sampled_from(sorted(VOLUMES)),
        data=st.data(),
        kind=st.sampled_from(["random", "zero", "byte"]),
        blocking=st.booleans(),
    )
    def write(self, vol: str, data: st.DataObject, kind: str, blocking: bool) -> None:
        size = len(self.model[vol])
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(size - offset, 70000)), label="length")
        if kind == "random":
            payload = data.draw(st.binary(min_size=length, max_size=length), label="payload")
        else:
            payload = bytes([0 if kind == "zero" else 0xA5]) * length
        dev = self.engine.open_export(vol)
        try:
            if blocking or not dev.write_nowait(offset, payload):
                dev.write(offset, payload)
        finally:
            dev.close()
        self.model[vol][offset : offset + length] = payload
        self.touch(vol, offset, length)

    def touch(self, vol: str, offset: int, length: int) -> None:
        chunk = VOLUMES[vol][1]
        self.history[vol].append(set(range(offset // chunk, (offset + length - 1) // chunk + 1)))

    @rule(
        vol=st.sampled_from(sorted(VOLUMES)),
        data=st.data(),
        punch=st.booleans(),
        blocking=st.booleans(),
    )
    def zero(self, vol: str, data: st.DataObject, punch: bool, blocking: bool) -> None:
        size = len(self.model[vol])
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, size - offset), label="length")
        dev = self.engine.open_export(vol)
        try:
            if blocking or not dev.zero_nowait(offset, length, punch=punch):
                dev.zero(offset, length, punch=punch)
        finally:
            dev.close()
        self.model[vol][offset : offset + length] = bytes(length)
        self.touch(vol, offset, length)

    @rule(target=snapshots, vols=st.sampled_from([["a"], ["b"], ["a", "b"]]))
    def snapshot(self, vols: list[str]) -> list[str]:
        infos = self.engine.create_snapshot_set(vols)
        assert [i.volume for i in infos] == vols
        assert len({i.set for i in infos}) == 1
        for info in infos:
            self.snaps[info.name] = bytes(self.model[info.volume])
            self.history[info.volume].append(info.name)
        return [i.name for i in infos]

    @rule(names=consumes(snapshots), which=st.integers(0, 1))
    def delete(self, names: list[str], which: int) -> None:
        name = names[which % len(names)]
        self.engine.delete_snapshot(name)
        del self.snaps[name]

    @rule()
    def flush(self) -> None:
        for vol in VOLUMES:
            dev = self.engine.open_export(vol)
            dev.flush()
            dev.close()

    @precondition(lambda self: True)
    @rule()
    def reopen(self) -> None:
        self.engine.close()
        self.engine = Engine.open(self.dir)

    @invariant()
    def contents_match(self) -> None:
        for name, expected in [*self.model.items(), *self.snaps.items()]:
            dev = self.engine.open_export(name)
            try:
                got = dev.pread(0, dev.size)
            finally:
                dev.close()
            assert got == expected, f"{name} differs from the model"
        live = {s.name for s in self.engine.snapshots()}
        assert live == set(self.snaps)

    @invariant()
    def small_reads_match(self) -> None:
        """Reads within one chunk (the engine's one-pread path, read_snapshot_small) agree
        with the model too: a piece of every chunk of every snapshot."""
        for name, expected in self.snaps.items():
            dev = self.engine.open_export(name)
            try:
                cs = VOLUMES[name.split("@")[0]][1]
                for start in range(0, dev.size, cs):
                    lo = start + start // cs % 7
                    hi = min(dev.size, start + cs - start // cs % 5)
                    assert dev.pread(lo, hi - lo) == expected[lo:hi], f"{name} at {lo}"
            finally:
                dev.close()

    @invariant()
    def maps_match(self) -> None:
        """Holes read as zeroes; dirty maps name exactly the chunks written in between."""
        for name, expected in [*self.model.items(), *self.snaps.items()]:
            dev = self.engine.open_export(name)
            try:
                for start, length, flags in walk(dev.extents, dev.size):
                    if flags & EXTENT_ZERO:
                        assert expected[start : start + length] == bytes(length), name
                for since in dev.dirty_bitmaps():
                    dirty = {
                        start // dev.chunk_size
                        for start, length, flags in walk(
                            functools.partial(dev.dirty_extents, since), dev.size
                        )
                        if flags
                        for start in range(start, start + length, dev.chunk_size)
                    }
                    assert dirty == self.expected_dirty(name, since), f"{name} vs {since}"
            finally:
                dev.close()

    def expected_dirty(self, name: str, since: str) -> set[int]:
        """The chunks written between snapshot `since` and export `name`, either order."""
        history = self.history[since.split("@")[0]]
        ends = sorted(history.index(n) if n in history else len(history) for n in (name, since))
        between = history[ends[0] : ends[1]]
        return set().union(*(h for h in between if isinstance(h, set)))

    @invariant()
    def consistent(self) -> None:
        self.engine.flush()
        assert check_consistency(self.engine) == []


def walk(
    query: Callable[[int, int], list[tuple[int, int]]], size: int
) -> Iterator[tuple[int, int, int]]:
    """(start, length, flags) over the whole device, asking again where a reply stops short."""
    pos = 0
    while pos < size:
        runs = query(pos, size - pos)
        assert runs and all(length > 0 for length, _flags in runs)
        for length, flags in runs:
            yield pos, min(length, size - pos), flags
            pos += length


EngineModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, print_blob=True
)
TestEngineModel = EngineModel.TestCase
