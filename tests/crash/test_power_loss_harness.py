"""The power-loss harness can fail: deliberately broken crash states are caught.

Design note

A small recorded run, with the engine in this process (the recorder is another process,
so mounting over its FUSE file from here is safe): volume v; 64 blocks written and
flushed; snapshot set v@1; 16 of those blocks rewritten and flushed. Then:
- every prefix state passes (so that the failures below come from the breaks);
- the last prefix state without the disk writes that carry the rewritten blocks (found by
  their stamped bytes in the log) must show a lost flushed write (I2);
- a state after v@1 was confirmed, without the disk writes that carry v@1's catalog row
  (found by its UUID: the WAL frames of its commit), must show v@1 lost (I1/I3).
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from crashload import BLOCK, BLOCKS, block_image
from powercheck import (
    Expectations,
    SetRecord,
    SnapshotRecord,
    VolumeRecord,
    check_crash_state,
)
from powerdisk import RecordedDisk, missing_host_support
from recorder import WRITE
from replay import CrashState, Materialiser, Record, flush_points, read_log

from shadowblk.provider.engine import Engine
from shadowblk.provider.exports import OriginDevice

FIRST, REWRITTEN = 64, 16  # blocks written before v@1, and rewritten after it
DISK_SIZE = 32 << 20


@dataclass
class SmallRun:
    disk: RecordedDisk
    exp: Expectations
    start: int  # event count when the writes began
    snapshot_id: str
    records: list[Record]


def write_and_flush(
    dev: OriginDevice,
    exp: Expectations,
    seqs: itertools.count[int],
    n: int,
    events: Callable[[], int],
) -> None:
    """Blocks 0..n-1, stamped, then a flush; all in the write log of volume v."""
    rec = exp.volumes["v"]
    for block in range(n):
        seq = next(seqs)
        issued = rec.log.now()
        dev.write(block * BLOCK, block_image(seq, block))
        rec.log.record(seq, (block, issued, rec.log.now()))
    start = rec.log.now()
    dev.flush()
    rec.flushes.append((start, events()))


def snapshot(engine: Engine, exp: Expectations, events: Callable[[], int]) -> str:
    requested = events()
    (info,) = engine.create_snapshot_set(["v"])
    exp.sets.append(SetRecord((info.name,), requested, events()))
    dev = engine.open_export(info.name)
    try:
        digest = hashlib.sha256(dev.pread(0, dev.size)).hexdigest()
    finally:
        dev.close()
    exp.snapshots[info.name] = SnapshotRecord(digest)
    return info.id


def record_small_run(disk: RecordedDisk) -> tuple[Expectations, int, str]:
    exp, seqs = Expectations({"v": VolumeRecord()}), itertools.count(1)
    engine = Engine.open(disk.mountpoint)
    try:
        engine.create_volume("v", size=BLOCKS * BLOCK)
        start = disk.events()
        dev = engine.open_export("v")
        assert isinstance(dev, OriginDevice)
        try:
            write_and_flush(dev, exp, seqs, FIRST, disk.events)
            snapshot_id = snapshot(engine, exp, disk.events)
            write_and_flush(dev, exp, seqs, REWRITTEN, disk.events)
        finally:
            dev.close()
    finally:
        engine.close()
    return exp, start, snapshot_id


@pytest.fixture(scope="module")
def small_run() -> Iterator[SmallRun]:
    reason = missing_host_support()
    if reason:
        pytest.skip(f"power-loss replay needs FUSE and loop devices: {reason}")
    workdir = Path(tempfile.mkdtemp(prefix="sbk-plh-"))
    try:
        with RecordedDisk(workdir, DISK_SIZE) as disk:
            exp, start, snapshot_id = record_small_run(disk)
        yield SmallRun(disk, exp, start, snapshot_id, read_log(disk.log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check(run: SmallRun, *states: CrashState) -> list[list[str]]:
    mat = Materialiser(run.disk.base, run.disk.log, run.records)
    try:
        return [check_crash_state(mat, s, run.disk.mountpoint, run.exp) for s in sorted(states)]
    finally:
        mat.close()


def carrying(run: SmallRun, needle: bytes, before: int) -> tuple[int, ...]:
    """The WRITE records below `before` whose data holds `needle`."""
    with open(f"{run.disk.log}.dat", "rb") as f:
        data = f.read()
    return tuple(
        i
        for i, r in enumerate(run.records[:before])
        if r.kind == WRITE and needle in data[r.pos : r.pos + r.length]
    )


def test_every_prefix_of_a_small_run_passes(small_run: SmallRun) -> None:
    points = flush_points(small_run.records, small_run.start)
    assert len(points) >= 3, "loop-device flushes did not reach the recorder as fsync"
    results = check(small_run, *(CrashState(d) for d in points))
    assert all(r == [] for r in results), [r for r in results if r]


def test_a_dropped_flushed_origin_write_is_caught(small_run: SmallRun) -> None:
    last = flush_points(small_run.records, small_run.start)[-1]
    seq = FIRST + REWRITTEN  # the last write: block REWRITTEN - 1, flushed
    dropped = carrying(small_run, block_image(seq, REWRITTEN - 1), last)
    assert dropped, "the rewritten block's bytes are not in the log"
    (problems,) = check(small_run, CrashState(last, dropped=dropped))
    assert any("lost flushed" in p and "(I2)" in p for p in problems), problems


def test_a_lost_catalog_commit_is_caught(small_run: SmallRun) -> None:
    confirmed = small_run.exp.sets[0].confirmed
    state = min(d for d in flush_points(small_run.records, small_run.start) if d >= confirmed)
    dropped = carrying(small_run, small_run.snapshot_id.encode(), state)
    assert dropped, "the snapshot's catalog row is not in the log"
    (problems,) = check(small_run, CrashState(state, dropped=dropped))
    assert any("v@1" in p and "lost" in p for p in problems), problems
