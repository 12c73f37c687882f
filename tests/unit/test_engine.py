"""Engine behaviour the model test does not pin down: copy counts, reclaim, identity."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from shadowblk.provider import engine as engine_module
from shadowblk.provider import faults
from shadowblk.provider import preserver as preserver_module
from shadowblk.provider.catalog import FORMAT_VERSION
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
    MaxSnapshots,
    NotFound,
    NotSupported,
    OutOfRange,
    ReadOnly,
)
from shadowblk.provider.fsck import check_consistency
from shadowblk.provider.origin import OverlayStuck

CHUNK = 65536


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
    engine.settle()  # the copy is the preserver's, after the write
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
    engine.flush()  # the preserves are in: the delete frees them itself
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


def test_a_corrupt_block_fails_every_read_that_touches_it(engine: Engine) -> None:
    # checksums are per 4 KiB block: a read checks the blocks it reads, never fewer
    engine.create_volume("v", size=1 << 20)
    before = os.urandom(1 << 20)
    write(engine, "v", 0, before)
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(CHUNK))
    engine.flush()
    data_file = Path(engine.volumes()[0].diff_area) / DATA
    with open(data_file, "r+b") as f:  # slot 0, block 5
        f.seek(5 * 4096 + 7)
        byte = f.read(1)
        f.seek(5 * 4096 + 7)
        f.write(bytes([byte[0] ^ 0x01]))
    assert read(engine, "v@1", 0, 5 * 4096) == before[: 5 * 4096]
    assert read(engine, "v@1", 7 * 4096 - 1, 2) == before[7 * 4096 - 1 : 7 * 4096 + 1]
    for offset, length in [
        (5 * 4096 + 7, 1),
        (6 * 4096 - 1, 2),
        (4 * 4096 + 100, 4096),
        (0, CHUNK),
    ]:
        with pytest.raises(DamagedData):
            read(engine, "v@1", offset, length)
    assert engine.snapshots()[0].state == "damaged"


def test_a_read_of_no_bytes_inside_a_preserved_chunk_is_empty(engine: Engine) -> None:
    # at a block boundary inside the chunk, it once read no bytes from the slot and
    # checked them against the next block's checksum: DamagedData, snapshot damaged
    engine.create_volume("v", size=1 << 20)
    write(engine, "v", 0, os.urandom(CHUNK))
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(CHUNK))
    engine.flush()
    engine.settle()
    for offset in (0, 4096, CHUNK - 4096, CHUNK):
        assert read(engine, "v@1", offset, 0) == b""
    assert engine.snapshots()[0].state == "ok"


def test_reads_gathered_across_consecutive_slots_check_every_chunk(engine: Engine) -> None:
    # one write preserves 16 chunks together: consecutive slots, read with one preadv
    engine.create_volume("v", size=1 << 20)
    before = os.urandom(1 << 20)
    write(engine, "v", 0, before)
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.flush()
    assert read(engine, "v@1") == before
    assert (
        read(engine, "v@1", 3 * CHUNK - 100, 5 * CHUNK + 200)
        == before[3 * CHUNK - 100 :][: 5 * CHUNK + 200]
    )
    data_file = Path(engine.volumes()[0].diff_area) / DATA
    slots = data_file.read_bytes()
    victim = next(i for i in range(16) if slots[i * CHUNK :][:CHUNK] == before[7 * CHUNK :][:CHUNK])
    with open(data_file, "r+b") as f:  # chunk 7, block 3
        f.seek(victim * CHUNK + 3 * 4096)
        f.write(bytes([slots[victim * CHUNK + 3 * 4096] ^ 0x80]))
    with pytest.raises(DamagedData, match="chunk 7 "):
        read(engine, "v@1")
    assert read(engine, "v@1", 0, 7 * CHUNK) == before[: 7 * CHUNK]
    assert read(engine, "v@1", 8 * CHUNK, 8 * CHUNK) == before[8 * CHUNK :]


def test_each_snapshots_diff_bytes_is_what_deleting_it_frees(engine: Engine) -> None:
    rng = random.Random(7)
    engine.create_volume("v", size=64 * CHUNK)
    write(engine, "v", 0, os.urandom(64 * CHUNK))
    for _ in range(12):
        engine.create_snapshot_set(["v"])
        for _ in range(rng.randrange(1, 20)):
            write(engine, "v", rng.randrange(64) * CHUNK + rng.randrange(CHUNK - 512), b"w" * 512)
    engine.flush()
    while engine.snapshots():
        victim = rng.choice(engine.snapshots())
        used = engine.statistics()["volumes"]["v"]["diff_bytes"]
        engine.delete_snapshot(victim.name)
        freed = used - engine.statistics()["volumes"]["v"]["diff_bytes"]
        assert freed == victim.diff_bytes, victim.name


def test_written_origins_get_their_writeback_started(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    origin = engine._volumes["v"].origin  # noqa: SLF001 - the writeback's own flag
    write(engine, "v", 0, b"a" * 4096)
    deadline = time.monotonic() + 30  # a bound on the wait, not a figure checked
    while origin.dirty and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not origin.dirty
    write(engine, "v", 4096, b"b" * 4096)  # and again: the thread sleeps until poked
    while origin.dirty and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not origin.dirty


def revert_scene(engine: Engine) -> dict[str, bytes]:
    """v@1..v@3 over a 1 MiB volume with data, zeroes and holes; the contents of each."""
    engine.create_volume("v", size=16 * CHUNK, sparse=True)
    write(engine, "v", 0, os.urandom(12 * CHUNK))  # chunks 12-15 stay zero
    seen = {}
    for n in (1, 2, 3):
        engine.create_snapshot_set(["v"])
        seen[f"v@{n}"] = read(engine, f"v@{n}")
        write(engine, "v", n * CHUNK + 100, os.urandom(CHUNK))  # chunks n, n+1
        write(engine, "v", (11 + n) * CHUNK, os.urandom(4096))  # a zero chunk, written
    engine.flush()
    return seen


def test_revert_copies_back_and_deletes_the_newer_snapshots(engine: Engine) -> None:
    seen = revert_scene(engine)
    used = engine.statistics()["volumes"]["v"]["diff_bytes"]
    result = engine.revert("v@2")
    assert result["deleted"] == ["v@2", "v@3"] and result["chunks"] == 5  # 2, 3, 4, 13, 14
    assert read(engine, "v") == seen["v@2"]
    assert [s.name for s in engine.snapshots()] == ["v@1"]
    assert read(engine, "v@1") == seen["v@1"]
    assert engine.statistics()["volumes"]["v"]["diff_bytes"] < used
    assert check_consistency(engine) == []
    write(engine, "v", 0, os.urandom(16 * CHUNK))  # and copy-on-write goes on for v@1
    engine.flush()
    assert read(engine, "v@1") == seen["v@1"]
    assert check_consistency(engine) == []


def test_revert_is_refused_while_the_origin_is_open(engine: Engine) -> None:
    revert_scene(engine)
    dev = engine.open_export("v")
    try:
        with pytest.raises(Busy, match="open"):
            engine.revert("v@1")
    finally:
        dev.close()
    snap = engine.open_export("v@3")
    try:
        with pytest.raises(Busy, match="v@3"):
            engine.revert("v@2")
        engine.revert("v@2", force=True)
    finally:
        snap.close()
    assert [s.name for s in engine.snapshots()] == ["v@1"]


def test_an_interrupted_revert_finishes_at_the_next_open(tmp_path: Path) -> None:
    engine = Engine.open(tmp_path / "s")
    seen = revert_scene(engine)
    origin = engine._volumes["v"].origin  # noqa: SLF001 - make the 3rd copy fail
    real, calls = origin.pwrite, []

    def failing(offset: int, data: Any) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.EIO, "injected")
        real(offset, data)

    origin.pwrite = failing  # type: ignore[method-assign]
    with pytest.raises(OSError):
        engine.revert("v@1")
    origin.pwrite = real  # type: ignore[method-assign]
    assert {s.name for s in engine.snapshots()} == {"v@1", "v@2", "v@3"}  # not committed
    engine.close()
    engine = Engine.open(tmp_path / "s")
    try:
        assert read(engine, "v") == seen["v@1"]
        assert engine.snapshots() == []
        assert check_consistency(engine) == []
    finally:
        engine.close()


@pytest.mark.parametrize("point", ["preserve.write", "preserve.sync", "preserve.commit"])
def test_a_failing_diff_area_invalidates_snapshots_never_the_write(
    engine: Engine, point: str
) -> None:
    engine.create_volume("v", size=1 << 20)
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.create_snapshot_set(["v"])
    opened = engine.open_export("v@1")  # open before: still listed, its state invalid
    faults.arm(f"{point}=eio")
    try:
        new = os.urandom(CHUNK)
        write(engine, "v", 2 * CHUNK, new)  # acknowledged: the preserve fails after
        engine.settle()
    finally:
        faults.disarm()
    assert read(engine, "v", 2 * CHUNK, CHUNK) == new
    assert [s.state for s in engine.snapshots()] == ["invalid"]
    with pytest.raises(DamagedData):
        read(engine, "v@1", 0, 4096)
    for offset, length in [(0, 4096), (2 * CHUNK, 4096), (0, 3 * CHUNK)]:
        with pytest.raises(DamagedData):
            opened.pread(offset, length)
    opened.close()
    engine.create_snapshot_set(["v"])  # and the next snapshot works
    write(engine, "v", 5 * CHUNK, b"n" * 4096)
    engine.flush()
    assert read(engine, "v@2", 2 * CHUNK, CHUNK) == new
    assert check_consistency(engine) == []


def test_creation_phases_are_reported_for_the_last_creations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`statistics()` keeps where each of the last CREATE_HISTORY successful creations spent
    its time; a refused creation leaves no record."""
    monkeypatch.setattr(engine_module, "CREATE_HISTORY", 3)
    engine = Engine.open(tmp_path / "state")
    try:
        engine.create_volume("v", size=1 << 20, max_snapshots=4)
        for i in range(4):
            write(engine, "v", i * CHUNK, os.urandom(4096))  # a preserve for the drain
            engine.create_snapshot_set(["v"])
        with pytest.raises(MaxSnapshots):
            engine.create_snapshot_set(["v"])
        history = engine.statistics()["create_phases_ms"]
    finally:
        engine.close()
    assert len(history) == 3
    for phases in history:
        assert set(phases) == {"hold", "drain", "sync", "catalog", "commit", "total"}
        assert all(value >= 0 for value in phases.values())
        # the sync runs beside the catalog work (rows written while it lasts)
        steps = phases["hold"] + phases["drain"] + phases["commit"]
        steps += max(phases["sync"], phases["catalog"])
        assert steps <= phases["total"] + 0.01  # each rounded to the microsecond


def test_the_snapshot_limit_and_its_error(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20, sparse=True)
    for _ in range(512):
        engine.create_snapshot_set(["v"])
    with pytest.raises(MaxSnapshots, match="512 snapshots"):
        engine.create_snapshot_set(["v"])
    engine.set_volume("v", max_snapshots=4096)
    engine.create_snapshot_set(["v"])
    assert len(engine.snapshots()) == 513


def test_a_format_1_catalog_is_migrated_to_block_checksums(tmp_path: Path) -> None:
    engine = Engine.open(tmp_path / "s")
    engine.create_volume("v", size=1 << 20)
    before = os.urandom(1 << 20)
    write(engine, "v", 0, before)
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(3 * CHUNK))
    engine.flush()
    data_file = Path(engine.volumes()[0].diff_area) / DATA
    engine.close()
    # rewrite the catalog as format 1 wrote it: one xxh3-128 per chunk, no column
    chunks = data_file.read_bytes()
    db = sqlite3.connect(tmp_path / "s" / "catalog.db")
    for chunk, slot in db.execute("SELECT chunk, slot FROM chunks").fetchall():
        digest = xxhash.xxh3_128_digest(chunks[slot * CHUNK : (slot + 1) * CHUNK])
        if chunk == 1:  # a chunk format 1 would have found damaged
            digest = bytes(16)
        db.execute("UPDATE chunks SET hash=? WHERE chunk=?", (digest, chunk))
    db.execute("ALTER TABLE volumes DROP COLUMN legacy_checksums")
    db.execute("ALTER TABLE volumes DROP COLUMN max_snapshots")
    db.execute("ALTER TABLE volumes DROP COLUMN revert_epoch")
    db.execute("UPDATE meta SET value='1' WHERE key='format_version'")
    db.commit()
    db.close()
    engine = Engine.open(tmp_path / "s")
    try:
        assert read(engine, "v@1", 0, CHUNK) == before[:CHUNK]
        assert read(engine, "v@1", 2 * CHUNK + 4096, 100) == before[2 * CHUNK + 4096 :][:100]
        with pytest.raises(DamagedData):
            read(engine, "v@1", CHUNK + 4096, 4096)
    finally:
        engine.close()
    db = sqlite3.connect(tmp_path / "s" / "catalog.db")
    version = db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
    assert version == (str(FORMAT_VERSION),)
    assert db.execute("SELECT legacy_checksums, max_snapshots FROM volumes").fetchall() == [
        (0, 512)
    ]
    assert {len(h) for (h,) in db.execute("SELECT hash FROM chunks")} == {CHUNK // 4096 * 8}
    db.close()


def test_huge_sparse_volume_snapshots_without_a_scan(engine: Engine) -> None:
    engine.create_volume("big", size=15 << 40, sparse=True)
    write(engine, "big", (15 << 40) - 4096, b"e" * 4096)
    engine.create_snapshot_set(["big"])
    write(engine, "big", (15 << 40) - 4096, b"f" * 4096)
    assert read(engine, "big@1", (15 << 40) - 4096) == b"e" * 4096
    engine.settle()
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
    listed = {s.name: s.state for s in engine.snapshots()}
    if policy == "delete-oldest":
        assert listed == {"v@2": "ok", "v@3": "ok"}
        assert read(engine, "v@2") == kept
    else:  # every snapshot stays listed, invalid: no export, reads fail, space freed
        assert listed == {"v@1": "invalid", "v@2": "invalid", "v@3": "invalid"}
        assert [n for n, _ in engine.export_names()] == ["v"]
        with pytest.raises(DamagedData, match="invalid"):
            read(engine, "v@2")
    assert read(engine, "v", 0, 8 * CHUNK) == image
    assert engine.volumes()[0].diff_bytes <= 20 * CHUNK
    assert check_consistency(engine) == []


def test_invalid_snapshots_stay_listed_across_restarts_until_deleted(tmp_path: Path) -> None:
    engine = Engine.open(tmp_path / "s")
    engine.create_volume("v", size=4 << 20, max_diff=8 * CHUNK, full_policy="invalidate")
    write(engine, "v", 0, os.urandom(4 << 20))
    engine.create_snapshot_set(["v"])
    write(engine, "v", 0, os.urandom(12 * CHUNK))  # past the limit: v@1 invalidated
    engine.create_snapshot_set(["v"])
    engine.close()
    engine = Engine.open(tmp_path / "s")
    try:
        assert {s.name: s.state for s in engine.snapshots()} == {"v@1": "invalid", "v@2": "ok"}
        assert engine.volumes()[0].diff_bytes == 0
        engine.delete_snapshot("v@1")
        assert [s.name for s in engine.snapshots()] == ["v@2"]
        assert check_consistency(engine) == []
    finally:
        engine.close()


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


def test_zeroing_preserves_as_zero_entries_without_copying_zeroes(engine: Engine) -> None:
    size = 40 << 20  # more than one 32 MiB batch
    engine.create_volume("v", size=size)
    data = os.urandom(1 << 20)
    write(engine, "v", 0, data)  # 1 MiB of data, then 39 MiB of zeroes
    engine.create_snapshot_set(["v"])
    dev = engine.open_export("v")
    try:
        assert not dev.zero_nowait(0, size, punch=True)  # larger than one batch: blocking
        dev.zero(0, size, punch=True)
    finally:
        dev.close()
    engine.settle()
    stats = engine.statistics()
    assert stats["zero_entries"] == 39 * 16  # what read as zeroes: nothing copied
    assert stats["volumes"]["v"]["diff_bytes"] == 1 << 20
    assert read(engine, "v@1") == data + bytes(size - (1 << 20))
    assert read(engine, "v") == bytes(size)


def test_fast_zero_is_refused_when_chunks_must_be_preserved(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    write(engine, "v", 0, b"x" * CHUNK)
    dev = engine.open_export("v")
    try:
        dev.zero(0, CHUNK, punch=False, fast=True)  # no snapshot: nothing to preserve
        engine.create_snapshot_set(["v"])
        write(engine, "v", 0, b"y" * CHUNK)
        with pytest.raises(NotSupported):
            dev.zero(0, 2 * CHUNK, punch=False, fast=True)  # chunk 1 still needs a preserve
        assert read(engine, "v", 0, CHUNK) == b"y" * CHUNK  # nothing was zeroed
        dev.zero(0, CHUNK, punch=False, fast=True)  # chunk 0 was preserved already
    finally:
        dev.close()
    assert read(engine, "v", 0, CHUNK) == bytes(CHUNK)


def test_an_allocated_volume_stays_allocated_when_trimmed(engine: Engine) -> None:
    info = engine.create_volume("v", size=4 << 20)
    engine.create_volume("s", size=4 << 20, sparse=True)
    assert allocated(Path(info.origin)) >= 4 << 20
    for name in ("v", "s"):
        write(engine, name, 0, os.urandom(4 << 20))
        dev = engine.open_export(name)
        dev.zero(0, 4 << 20, punch=True)
        dev.close()
    volumes = {v.name: v for v in engine.volumes()}
    assert allocated(Path(volumes["v"].origin)) >= 4 << 20  # a later write cannot ENOSPC
    assert allocated(Path(volumes["s"].origin)) == 0
    assert read(engine, "v") == read(engine, "s") == bytes(4 << 20)


def test_allocation_map_of_origin_and_snapshot(engine: Engine) -> None:
    engine.create_volume("v", size=4 << 20, sparse=True)
    write(engine, "v", CHUNK, os.urandom(CHUNK))
    engine.create_snapshot_set(["v"])
    write(engine, "v", 3 * CHUNK, os.urandom(CHUNK))  # snapshot: a zero entry here
    engine.flush()
    origin = engine.open_export("v")
    snap = engine.open_export("v@1")
    try:
        assert origin.extents(0, 4 << 20)[:4] == [(CHUNK, 3), (CHUNK, 0), (CHUNK, 3), (CHUNK, 0)]
        assert snap.extents(0, 4 << 20)[:2] == [(CHUNK, 3), (CHUNK, 0)]
        assert snap.extents(2 * CHUNK, 2 * CHUNK) == [(2 * CHUNK, 3)]
        assert origin.dirty_extents("v@1", 0, 4 << 20) == [
            (3 * CHUNK, 0),
            (CHUNK, 1),
            ((4 << 20) - 4 * CHUNK, 0),
        ]
    finally:
        origin.close()
        snap.close()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A real block device: a loop device over a 16 MiB file."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(os.urandom(16 << 20))
    try:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"this host cannot attach a loop device: {e}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_block_device_origin(engine: Engine, loop_device: str, tmp_path: Path) -> None:
    info = engine.create_volume("b", backing=loop_device)
    assert (info.origin_kind, info.size) == ("block", 16 << 20)
    before = read(engine, "b")
    engine.create_snapshot_set(["b"])
    dev = engine.open_export("b")
    try:
        dev.zero(CHUNK, 3 * CHUNK, punch=True)  # BLKZEROOUT under the hood
        dev.write(0, b"w" * 4096)
    finally:
        dev.close()
    assert read(engine, "b@1") == before
    assert read(engine, "b", CHUNK, 3 * CHUNK) == bytes(3 * CHUNK)
    engine.settle()  # the overlay reaches the device once the preserves are durable
    with open(loop_device, "rb") as raw:  # read back through the kernel, not the engine
        raw.seek(CHUNK)
        assert raw.read(3 * CHUNK) == bytes(3 * CHUNK)
    other = Engine.open(tmp_path / "other")
    try:
        with pytest.raises(Locked, match="in use"):
            other.create_volume("b", backing=loop_device)  # held O_EXCL by the first
    finally:
        other.close()


def test_a_trim_over_preserved_chunks_leaves_holes_on_a_sparse_volume(engine: Engine) -> None:
    info = engine.create_volume("s", size=1 << 20, sparse=True)
    write(engine, "s", 0, os.urandom(1 << 20))
    engine.create_snapshot_set(["s"])
    dev = engine.open_export("s")
    try:
        dev.zero(CHUNK, 4 * CHUNK, punch=True)  # the overlay zeroes, then the write-back
        dev.write(2 * CHUNK, b"d" * 100)  # data over part of the zeroed range, after it
    finally:
        dev.close()
    engine.settle()
    origin = Path(info.origin)
    with open(origin, "rb") as f:  # punched, not written zeroes: holes around the data
        data_at = [os.lseek(f.fileno(), pos, os.SEEK_DATA) for pos in (CHUNK, 2 * CHUNK + 4096)]
    assert data_at == [2 * CHUNK, 5 * CHUNK]
    expected = bytearray(read(engine, "s@1"))
    expected[CHUNK : 5 * CHUNK] = bytes(4 * CHUNK)
    expected[2 * CHUNK : 2 * CHUNK + 100] = b"d" * 100
    assert origin.read_bytes() == bytes(expected)


def test_a_failed_preserve_invalidates_durably_before_the_write_lands(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diff-area I/O error: the snapshot is marked invalid in the catalog first, then the
    acknowledged write still reaches the origin (never dropped)."""
    engine.create_volume("v", size=1 << 20)
    write(engine, "v", 0, os.urandom(1 << 20))
    engine.create_snapshot_set(["v"])
    (vol,) = engine._volumes.values()
    db = engine.state_dir / "catalog.db"

    def failing_write(slot: int, data: object) -> None:
        raise OSError(errno.EIO, "injected diff-area I/O error")

    def catalog_state() -> str:
        con = sqlite3.connect(db)
        try:
            return str(con.execute("SELECT state FROM snapshots").fetchone()[0])
        finally:
            con.close()

    seen: list[str] = []
    origin_pwrite = vol.origin.pwrite

    def watched_pwrite(offset: int, data: bytes | bytearray | memoryview, log: bool = True) -> None:
        seen.append(catalog_state())
        origin_pwrite(offset, data, log)

    monkeypatch.setattr(vol.diff, "write", failing_write)
    monkeypatch.setattr(vol.origin, "pwrite", watched_pwrite)
    write(engine, "v", 4096, b"n" * 4096)
    engine.settle()
    assert seen and set(seen) == {"invalid"}  # durable before the origin changed
    monkeypatch.undo()
    assert read(engine, "v", 4096, 4096) == b"n" * 4096
    with pytest.raises(DamagedData):
        read(engine, "v@1", 0, 4096)


def test_a_write_during_the_write_back_of_its_batch_reaches_the_origin(engine: Engine) -> None:
    # Regression: overlays are written back outside the engine lock, in rounds while later
    # writes change them. A chunk already written back in round 1 and written to again
    # during round 2 (while another chunk of its batch went again) was dropped from the
    # overlay with its last write never on the origin. The write-back is observed through
    # the volume's own method: its calls stage the writes at those exact moments.
    engine.create_volume("v", size=1 << 20)
    old = os.urandom(1 << 20)
    write(engine, "v", 0, old)
    engine.create_snapshot_set(["v"])
    vol = engine._volumes["v"]
    a, b = 4 * CHUNK, 9 * CHUNK
    new_a, new_b, again_a, again_b = (os.urandom(4096) for _ in range(4))
    real_write_back = vol.write_back
    rounds_of_a: list[int] = []
    calls: list[int] = []  # the chunk of every write-back call, in order

    def staged(pending: Any, ranges: Any) -> Any:
        calls.append(pending.chunk * CHUNK)
        if pending.chunk * CHUNK == a:
            rounds_of_a.append(1)
            if len(rounds_of_a) == 1:
                write(engine, "v", a, again_a)  # a goes again in round 2
            elif len(rounds_of_a) == 2:
                write(engine, "v", b, again_b)  # b was written back in round 1
        return real_write_back(pending, ranges)

    vol.write_back = staged  # type: ignore[method-assign]
    faults.arm("preserve.write=delay:300")  # the first batch waits: a and b queue together
    try:
        write(engine, "v", 0, b"z" * 4096)
        write(engine, "v", a, new_a)
        write(engine, "v", b, new_b)
        engine.settle()
    finally:
        faults.disarm()
        vol.write_back = real_write_back  # type: ignore[method-assign]
    assert len(rounds_of_a) >= 2, "a was not written back twice: the scene did not happen"
    second_a = [i for i, chunk in enumerate(calls) if chunk == a][1]
    assert b in calls[:second_a], "b was not written back before a's second round: no scene"
    fd = os.open(vol.origin.path, os.O_RDONLY)  # the origin file itself, not the engine
    try:
        assert os.pread(fd, 4096, a) == again_a
        assert os.pread(fd, 4096, b) == again_b, "a write acknowledged before a FLUSH was lost"
    finally:
        os.close(fd)
    assert read(engine, "v@1", a, 4096) == old[a : a + 4096]
    assert check_consistency(engine) == []


def test_a_write_held_by_a_creation_is_told_when_it_may_go_ahead(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait_writable`: what the NBD server uses so a held write waits in its task, not in
    a worker thread of its own."""
    engine.create_volume("v", size=1 << 20)
    dev = engine.open_export("v")
    syncing, release = threading.Event(), threading.Event()
    real_sync = engine_module._sync_origins

    def gated_sync(*args: Any) -> float:  # the creation holds writes until released
        syncing.set()
        assert release.wait(30), "the test never released the creation"
        return real_sync(*args)

    monkeypatch.setattr(engine_module, "_sync_origins", gated_sync)
    creating = threading.Thread(target=engine.create_snapshot_set, args=(["v"],))
    try:
        creating.start()
        assert syncing.wait(30), "the creation never reached its sync"
        assert not dev.write_nowait(0, b"w" * 4096)  # held
        woken = threading.Event()
        assert dev.wait_writable(0, 4096, woken.set)
        assert not woken.is_set()  # still held
        release.set()
        assert woken.wait(30), "the held write was never woken"
        creating.join(30)
        assert dev.write_nowait(0, b"w" * 4096)
        assert not dev.wait_writable(0, 4096, woken.set)  # nothing to wait for now
    finally:
        release.set()
        creating.join(30)
        dev.close()
    assert read(engine, "v@1", 0, 4096) == bytes(4096)
    assert read(engine, "v", 0, 4096) == b"w" * 4096


def test_a_hole_is_preserved_without_reading_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write to a hole of a sparse volume after a snapshot preserves a zero entry
    without reading the chunk (SEEK_DATA); a chunk whose data is still only in the page
    cache is no hole, and is read and copied."""
    engine.create_volume("s", size=1 << 20, sparse=True)
    write(engine, "s", 3 * CHUNK, b"d" * 4096)  # never synced: in the page cache only
    engine.create_snapshot_set(["s"])
    vol = engine._volumes["s"]
    reads: list[int] = []
    real_pread = vol.origin.pread

    def counted(offset: int, length: int) -> bytes:
        reads.append(offset)
        return real_pread(offset, length)

    monkeypatch.setattr(vol.origin, "pread", counted)
    write(engine, "s", 5 * CHUNK, b"h" * 4096)  # a hole
    write(engine, "s", 3 * CHUNK + 8192, b"n" * 4096)  # the data chunk
    engine.settle()
    monkeypatch.undo()
    assert reads == [3 * CHUNK]  # the data chunk was read; the hole was not
    stats = engine.statistics()
    assert (stats["chunks_preserved"], stats["zero_entries"]) == (2, 1)
    assert read(engine, "s@1", 5 * CHUNK, CHUNK) == bytes(CHUNK)
    assert read(engine, "s@1", 3 * CHUNK, 4096) == b"d" * 4096
    assert read(engine, "s", 5 * CHUNK, 4096) == b"h" * 4096


def test_a_refused_write_back_keeps_the_write_until_the_origin_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A journaled write acknowledged from the overlay whose write-back the origin refuses:
    the chunk stays in the overlay (reads see the write), its journal record stays pinned
    (a checkpoint cuts nothing before it), a clean close while the origin still refuses
    keeps the journal, and the next open replays the write onto the origin."""
    monkeypatch.setattr(preserver_module, "RETRY_INTERVAL", 3600.0)  # tried again at close
    eng = Engine.open(tmp_path / "state")
    eng.create_volume("v", size=1 << 20)
    old = os.urandom(1 << 20)
    write(eng, "v", 0, old)
    eng.create_snapshot_set(["v"])
    vol = eng._volumes["v"]
    at = 2 * CHUNK + 4096
    faults.arm("origin.write=eio")
    try:
        write(eng, "v", at, b"z" * 4096)  # journaled, acknowledged from the overlay
        deadline = time.monotonic() + 30
        while (p := vol.pending.get(at // CHUNK)) is None or p.stuck is None:
            assert time.monotonic() < deadline, "the write-back never failed"
            time.sleep(0.01)
        with pytest.raises(OSError) as info:
            eng.flush()
        assert info.value.errno == errno.EIO  # the failure, reported once
        eng.flush()  # the journal holds the write: durable
        assert read(eng, "v", at, 4096) == b"z" * 4096
        assert read(eng, "v@1", at, 4096) == old[at : at + 4096]
        start = vol.origin.journal.start
        with pytest.raises(OverlayStuck):  # at once: no waiting for a pin that is stuck
            vol.origin.checkpoint(time.monotonic() + 30)
        assert vol.origin.journal.start == start, "the checkpoint cut the journal"
        faults.arm("origin.write=eio")  # the last try, at close, fails too
        eng.close()
    finally:
        faults.disarm()
    fd = os.open(vol.origin.path, os.O_RDONLY)  # the origin file itself: never written
    try:
        assert os.pread(fd, 4096, at) == old[at : at + 4096]
    finally:
        os.close(fd)
    eng = Engine.open(tmp_path / "state")
    try:
        assert read(eng, "v", at, 4096) == b"z" * 4096, "the acknowledged write was lost"
        assert read(eng, "v@1", 0) == old
        assert check_consistency(eng) == []
    finally:
        eng.close()
