"""Engine behaviour the model test does not pin down: copy counts, reclaim, identity."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowblk.provider.diffarea import DATA
from shadowblk.provider.engine import Engine
from shadowblk.provider.errors import (
    AlreadyExists,
    Busy,
    DamagedData,
    FormatError,
    InsufficientStorage,
    InvalidArgument,
    Locked,
    NotFound,
    OutOfRange,
    ReadOnly,
)
from shadowblk.provider.fsck import check_consistency

CHUNK = 65536


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "state")
    yield eng
    eng.close()


def write(engine: Engine, name: str, offset: int, data: bytes) -> None:
    dev = engine.open_export(name)
    try:
        dev.write(offset, data)
    finally:
        dev.close()


def read(engine: Engine, name: str, offset: int = 0, length: int | None = None) -> bytes:
    dev = engine.open_export(name)
    try:
        return dev.pread(offset, dev.size - offset if length is None else length)
    finally:
        dev.close()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_one_copy_however_many_snapshots(engine: Engine) -> None:
    engine.create_volume("v", size=4 << 20)
    write(engine, "v", 0, os.urandom(4 << 20))
    for _ in range(50):
        engine.create_snapshot_set(["v"])
    before = engine.statistics()["chunks_preserved"]
    write(engine, "v", 3 * CHUNK + 100, b"z" * 4096)
    engine.flush()
    stats = engine.statistics()
    assert stats["chunks_preserved"] - before == 1
    assert stats["volumes"]["v"]["entries"] == 1
    assert check_consistency(engine) == []


def test_zero_chunks_are_preserved_without_copying(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, b"\xff" * (1 << 20))
    engine.flush()
    stats = engine.statistics()
    assert stats["zero_entries"] == 16
    assert stats["volumes"]["v"]["diff_bytes"] == 0
    assert read(engine, "v@1") == bytes(1 << 20)


def test_deleting_a_middle_snapshot_frees_its_unique_space(engine: Engine) -> None:
    engine.create_volume("v", size=2 << 20)
    write(engine, "v", 0, os.urandom(2 << 20))
    images = {}
    for _ in range(3):
        (info,) = engine.create_snapshot_set(["v"])
        images[info.name] = read(engine, "v")
        write(engine, "v", 0, os.urandom(8 * CHUNK))  # the same 8 chunks: unique to each
    engine.flush()
    data_file = Path(engine.volumes()[0].diff_area) / DATA
    before = allocated(data_file)
    unique = {s.name: s.diff_bytes for s in engine.snapshots()}
    assert unique["v@2"] == 8 * CHUNK
    engine.delete_snapshot("v@2")
    assert before - allocated(data_file) == 8 * CHUNK
    assert engine.statistics()["volumes"]["v"]["diff_bytes"] == 16 * CHUNK
    for name in ("v@1", "v@3"):
        assert read(engine, name) == images[name]
    assert check_consistency(engine) == []


def test_freed_space_is_reused(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.delete_snapshot("v@1")
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.flush()
    data_file = Path(engine.volumes()[0].diff_area) / DATA
    assert os.stat(data_file).st_size == 1 << 20  # 16 slots, reused, not 32


def test_writes_racing_snapshots_land_on_one_side(engine: Engine) -> None:
    """A write applied before create is in the snapshot; one applied after is not."""
    engine.create_volume("v", size=1 << 20, chunk_size=4096)
    stop = threading.Event()
    applied: list[int] = []

    def writer() -> None:
        dev = engine.open_export("v")
        n = 0
        while not stop.is_set():
            n += 1
            dev.write((n % 256) * 4096, n.to_bytes(8, "little") * 512)
            applied.append(n)
        dev.close()

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[tuple[str, int, int]] = []
    try:
        for _ in range(20):
            low = applied[-1] if applied else 0
            (info,) = engine.create_snapshot_set(["v"])
            high = applied[-1] if applied else 0
            seen.append((info.name, low, high))
    finally:
        stop.set()
        thread.join()
    for name, low, high in seen:
        image = read(engine, name)
        newest = max(int.from_bytes(image[i : i + 8], "little") for i in range(0, 1 << 20, 4096))
        assert low <= newest <= high + 1, name


def test_reads_and_writes_out_of_range(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    dev = engine.open_export("v")
    with pytest.raises(OutOfRange):
        dev.pread((1 << 20) - 10, 11)
    with pytest.raises(OutOfRange):
        dev.write(1 << 20, b"x")
    dev.close()
    engine.create_snapshot_set(["v"])
    snap = engine.open_export("v@1")
    with pytest.raises(ReadOnly):
        snap.write(0, b"x")
    snap.close()


def test_pinned_snapshot_refuses_delete(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    engine.create_snapshot_set(["v"])
    dev = engine.open_export("v@1")
    with pytest.raises(Busy):
        engine.delete_snapshot("v@1")
    dev.close()
    engine.delete_snapshot("v@1")
    with pytest.raises(NotFound):
        engine.open_export("v@1")


def test_a_second_service_on_the_state_dir_is_refused(engine: Engine) -> None:
    with pytest.raises(Locked, match="in use by another shadowblk service"):
        Engine.open(engine.state_dir)


def test_an_origin_is_adopted_once(engine: Engine, tmp_path: Path) -> None:
    backing = tmp_path / "disk.img"
    backing.write_bytes(bytes(1 << 20))
    engine.create_volume("a", backing=str(backing))
    with pytest.raises(Locked, match="already volume a"):
        engine.create_volume("b", backing=str(backing))
    other = Engine.open(tmp_path / "other-state")
    try:
        with pytest.raises(Locked, match="in use"):
            other.create_volume("b", backing=str(backing))
    finally:
        other.close()
    with pytest.raises(AlreadyExists):
        engine.create_volume("a", size=1 << 20)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 1000},
        {"size": 1 << 20, "chunk_size": 3000},
        {"size": 1 << 20, "chunk_size": 2 << 20},
        {"size": 1 << 20, "full_policy": "pray"},
        {},
    ],
)
def test_bad_volume_arguments(engine: Engine, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        engine.create_volume("v", **kwargs)  # type: ignore[arg-type]
    assert engine.volumes() == []


def test_a_missing_diff_area_makes_the_volume_unavailable(tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "s")
    info = eng.create_volume("v", size=1 << 20)
    eng.close()
    marker = Path(info.diff_area) / "shadowblk-diff-area.json"
    marker.rename(marker.with_suffix(".moved"))
    eng = Engine.open(tmp_path / "s")
    try:
        assert "marker" in eng.unavailable["v"]
        with pytest.raises(NotFound, match="unavailable"):
            eng.open_export("v")
    finally:
        eng.close()


def test_a_newer_catalog_is_refused(tmp_path: Path) -> None:
    Engine.open(tmp_path / "s").close()
    db = sqlite3.connect(tmp_path / "s" / "catalog.db")
    db.execute("UPDATE meta SET value='99' WHERE key='format_version'")
    db.commit()
    db.close()
    with pytest.raises(FormatError, match="format version 99"):
        Engine.open(tmp_path / "s")


def test_a_corrupt_diff_chunk_is_an_error_never_wrong_bytes(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(CHUNK))
    engine.flush()
    data_file = Path(engine.volumes()[0].diff_area) / DATA
    with open(data_file, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DamagedData):
        read(engine, "v@1", 0, 4096)
    assert read(engine, "v@1", CHUNK, 4096)  # other chunks still read
    assert engine.snapshots()[0].state == "damaged"


def test_huge_sparse_volume_snapshots_without_a_scan(engine: Engine) -> None:
    engine.create_volume("big", size=15 << 40, sparse=True)
    write(engine, "big", (15 << 40) - 4096, b"e" * 4096)
    engine.create_snapshot_set(["big"])
    write(engine, "big", (15 << 40) - 4096, b"f" * 4096)
    assert read(engine, "big@1", (15 << 40) - 4096) == b"e" * 4096
    engine.flush()
    assert engine.statistics()["volumes"]["big"]["changed_chunks"] == 1


def fill_after_snapshots(engine: Engine, count: int, chunks: int) -> None:
    """`count` snapshots, each followed by an overwrite of the first `chunks` chunks."""
    for _ in range(count):
        engine.create_snapshot_set(["v"])
        write(engine, "v", 0, os.urandom(chunks * CHUNK))


@pytest.mark.parametrize("policy", ["delete-oldest", "invalidate"])
def test_a_full_diff_area_never_fails_the_write(engine: Engine, policy: str) -> None:
    engine.create_volume("v", size=4 << 20, max_diff=20 * CHUNK, full_policy=policy)
    write(engine, "v", 0, os.urandom(4 << 20))
    fill_after_snapshots(engine, 2, 8)  # 16 chunks preserved of 20
    kept = read(engine, "v@2")
    engine.create_snapshot_set(["v"])
    image = os.urandom(8 * CHUNK)
    write(engine, "v", 0, image)  # needs 8 more: past the limit
    engine.flush()
    names = [s.name for s in engine.snapshots()]
    assert names == (["v@2", "v@3"] if policy == "delete-oldest" else [])
    if policy == "delete-oldest":
        assert read(engine, "v@2") == kept
    assert read(engine, "v", 0, 8 * CHUNK) == image
    assert engine.volumes()[0].diff_bytes <= 20 * CHUNK
    assert check_consistency(engine) == []


def test_fail_writes_answers_enospc_and_keeps_the_snapshots(engine: Engine) -> None:
    engine.create_volume("v", size=4 << 20, max_diff=10 * CHUNK, full_policy="fail-writes")
    write(engine, "v", 0, os.urandom(4 << 20))
    fill_after_snapshots(engine, 1, 8)
    before = read(engine, "v")
    dev = engine.open_export("v")
    try:
        assert not dev.write_nowait(20 * CHUNK, b"x" * 4 * CHUNK)  # never acked early
        with pytest.raises(InsufficientStorage):
            dev.write(20 * CHUNK, b"x" * 4 * CHUNK)
        dev.write(0, b"y" * CHUNK)  # an already preserved chunk needs no room
    finally:
        dev.close()
    assert read(engine, "v", CHUNK) == before[CHUNK:]
    assert [s.name for s in engine.snapshots()] == ["v@1"]
