"""The origin journal (provider/journal.py) through Origin, with simulated power loss.

A power loss is simulated on the files themselves: each file goes back to what its last
fdatasync made durable, except for a random mix of later sector writes that happened to
reach the disk. The origin is then reopened (its journal replayed) and read back through
its own file descriptor, a path that does not go through the journal.
"""

from __future__ import annotations

import errno
import os
import random
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowblk.provider import faults
from shadowblk.provider import journal as journal_mod
from shadowblk.provider.errors import FormatError
from shadowblk.provider.fileio import pread_full
from shadowblk.provider.journal import DATA, RING, SLOT, Journal
from shadowblk.provider.origin import CheckpointWait, Origin

BLOCK = 4096
BLOCKS = 16
SECTOR = 512
VID = str(uuid.UUID(int=7))


class Disk:
    """An origin with a journal, and what a power loss would leave of both."""

    def __init__(self, where: Path, seed: int = 0) -> None:
        self.where = where
        self.origin_path, self.journal_path = where / "origin", where / "journal"
        self.rnd = random.Random(seed)
        self.origin = Origin.create(self.origin_path, BLOCKS * BLOCK, sparse=True)
        self.origin.attach_journal(self.journal_path, VID)
        self.durable = self._images()  # (origin, journal) bytes as the disk holds them
        self.blocks = [bytes(BLOCK)] * BLOCKS  # the contents now
        self.synced = list(self.blocks)  # the contents at the last sync
        self.later: list[set[bytes]] = [set() for _ in range(BLOCKS)]  # written since

    def _images(self) -> tuple[bytes, bytes]:
        return self.origin_path.read_bytes(), self.journal_path.read_bytes()

    def write(self, block: int, count: int, fill: int) -> None:
        count = min(count, BLOCKS - block)
        data = bytes([fill]) * (count * BLOCK)
        self.origin.pwrite(block * BLOCK, data)
        self._wrote(block, count, data)

    def zero(self, block: int, count: int, punch: bool) -> None:
        count = min(count, BLOCKS - block)
        self.origin.zero(block * BLOCK, count * BLOCK, punch=punch)
        self._wrote(block, count, bytes(count * BLOCK))

    def _wrote(self, block: int, count: int, data: bytes) -> None:
        for i in range(count):
            self.blocks[block + i] = data[i * BLOCK : (i + 1) * BLOCK]
            self.later[block + i].add(self.blocks[block + i])

    def sync(self, checkpoint: bool = False) -> None:
        before = self.origin.checkpointed
        if checkpoint:
            self.origin.checkpoint()
        else:
            self.origin.sync()  # a checkpoint too, if a write bypassed the journal
        # what the fdatasyncs made durable: a checkpoint syncs both files, a journal sync
        # the journal (and the origin is no worse than before)
        origin, journal = self._images()
        self.durable = (origin if self.origin.checkpointed != before else self.durable[0],
                        journal)  # fmt: skip
        self.synced = list(self.blocks)
        self.later = [set() for _ in range(BLOCKS)]

    def power_loss(self, keep: float = 0.5) -> None:
        """Close without a checkpoint; each file becomes its durable image with a random
        subset of the sectors written since (each kept with probability `keep`)."""
        now = self._images()
        self.origin.close()
        for path, durable, current in zip(
            (self.origin_path, self.journal_path), self.durable, now, strict=True
        ):
            mixed = bytearray(durable.ljust(len(current), b"\0"))
            for pos in range(0, len(current), SECTOR):
                if self.rnd.random() < keep:
                    mixed[pos : pos + SECTOR] = current[pos : pos + SECTOR]
            path.write_bytes(bytes(mixed))

    def reopen(self) -> None:
        self.origin = Origin.open(self.origin_path)
        self.origin.attach_journal(self.journal_path, VID)
        self.durable = self._images()

    def check(self) -> None:
        """Every sector holds its value at the last sync, or one written after it (an
        unsynced write may be torn, as on a disk)."""
        for i in range(BLOCKS):
            got = pread_full(self.origin.fd, BLOCK, i * BLOCK)
            for pos in range(0, BLOCK, SECTOR):
                allowed = {v[pos : pos + SECTOR] for v in {self.synced[i]} | self.later[i]}
                assert got[pos : pos + SECTOR] in allowed, (
                    f"block {i}, sector {pos // SECTOR}: lost its synced contents"
                )
            self.blocks[i] = self.synced[i] = got
            self.later[i] = set()


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal of 6 records of a block, so it wraps and fills; writes over 2 blocks
    bypass it."""
    monkeypatch.setattr(journal_mod, "CAPACITY", 6 * (BLOCK + 64))
    monkeypatch.setattr(journal_mod, "MAX_DATA", 2 * BLOCK)


def test_a_synced_write_survives_an_origin_that_lost_it(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    disk.write(3, 1, 0xAB)
    disk.sync()
    disk.power_loss(keep=0)
    # the origin's durable image never had the write: only the journal can bring it back
    assert disk.origin_path.read_bytes()[3 * BLOCK : 4 * BLOCK] == bytes(BLOCK)
    disk.reopen()
    assert pread_full(disk.origin.fd, BLOCK, 3 * BLOCK) == bytes([0xAB]) * BLOCK
    disk.origin.close()


def test_a_write_around_the_journal_is_not_undone_by_an_older_record(
    tmp_path: Path, small: None
) -> None:
    disk = Disk(tmp_path)
    disk.write(0, 1, 0x11)  # journaled
    disk.write(0, 3, 0x22)  # too large for the journal: the origin alone has it
    assert disk.origin.journal is not None and disk.origin.journal.used() > 0
    disk.sync()  # must checkpoint: a replay of the first record would undo the second
    assert disk.origin.journal.used() == 0
    disk.power_loss()
    disk.reopen()
    assert pread_full(disk.origin.fd, BLOCK, 0) == bytes([0x22]) * BLOCK
    disk.origin.close()


def test_a_full_journal_sends_writes_to_the_origin_and_the_sync_checkpoints(
    tmp_path: Path, small: None
) -> None:
    disk = Disk(tmp_path)
    for i in range(10):  # more than 6 records fit
        disk.write(i, 1, 0x30 + i)
    disk.sync()
    disk.power_loss()
    disk.reopen()
    disk.check()
    assert [pread_full(disk.origin.fd, 1, i * BLOCK)[0] for i in range(10)] == [
        0x30 + i for i in range(10)
    ]
    disk.origin.close()


def test_a_failed_append_keeps_the_write_and_the_next_sync_checkpoints(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    faults.arm("journal.append=eio")
    try:
        disk.write(2, 1, 0x42)  # the origin has it; the journal does not
    finally:
        faults.disarm()
    assert disk.origin.journal is not None and disk.origin.journal.used() == 0
    disk.sync()  # must sync the origin itself
    disk.power_loss(keep=0)
    disk.reopen()
    assert pread_full(disk.origin.fd, BLOCK, 2 * BLOCK) == bytes([0x42]) * BLOCK
    disk.origin.close()


def test_a_checkpoint_does_not_cut_past_a_pinned_overlay_record(tmp_path: Path) -> None:
    """An overlay record's bytes are not on the origin until its preserve's write-back:
    a checkpoint waits for the pin (and gives up at its deadline, cutting nothing)."""
    disk = Disk(tmp_path)
    journal = disk.origin.journal
    assert journal is not None
    lsn = disk.origin.log_overlay(DATA, 0, BLOCK, b"o" * BLOCK, epoch=1, pin=True)
    assert lsn is not None
    disk.origin.pwrite(BLOCK, b"d" * BLOCK)  # a later record, the cut would pass both
    with pytest.raises(CheckpointWait):
        disk.origin.checkpoint(time.monotonic() + 0.05)
    assert journal.start <= lsn  # nothing cut: a replay still finds the overlay record
    disk.origin.unpin(lsn)
    disk.origin.checkpoint()
    assert journal.start > lsn
    disk.origin.close()


def test_a_background_checkpoint_keeps_an_etimedout_for_the_next_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fdatasync's ETIMEDOUT is an I/O error (a TimeoutError by its class): the next
    sync reports it, as any failed background checkpoint, never drops it."""
    disk = Disk(tmp_path)
    disk.origin.pwrite(0, b"x" * BLOCK)

    def timed_out(fd: int) -> None:
        raise OSError(errno.ETIMEDOUT, "injected")

    monkeypatch.setattr(os, "fdatasync", timed_out)
    disk.origin.background_checkpoint(0)
    monkeypatch.undo()
    with pytest.raises(OSError) as info:
        disk.origin.sync()
    assert info.value.errno == errno.ETIMEDOUT
    disk.origin.close()


def test_a_record_stays_whole_when_its_buffer_changes_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overlay's write-back hands the journal the overlay itself, which a later write
    may change meanwhile: the record must still match its checksum, or every replay ends
    there and loses the records after it."""
    disk = Disk(tmp_path)
    overlay = bytearray([0x10]) * BLOCK
    real = journal_mod.os.pwritev

    def racing(fd: int, buffers: list[bytes], offset: int) -> int:
        overlay[:] = bytes([0x20]) * BLOCK  # the later write, between checksum and write
        return real(fd, buffers, offset)

    monkeypatch.setattr(journal_mod.os, "pwritev", racing)
    disk.origin.pwrite(0, memoryview(overlay))
    monkeypatch.undo()
    disk.origin.pwrite(BLOCK, bytes([0x30]) * BLOCK)
    disk.sync()  # (checked below by hand: Disk did not see these two writes)
    disk.power_loss(keep=0)
    disk.reopen()
    assert pread_full(disk.origin.fd, BLOCK, BLOCK) == bytes([0x30]) * BLOCK
    assert pread_full(disk.origin.fd, BLOCK, 0) in (bytes([0x10]) * BLOCK, bytes([0x20]) * BLOCK)
    disk.origin.close()


def test_a_checkpoint_whose_header_fails_frees_no_ring_space(
    tmp_path: Path, small: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = Disk(tmp_path)
    for i in range(3):
        disk.write(i, 1, 0x50 + i)
    disk.sync()

    def failing(self: Journal, start: int) -> None:
        raise OSError(errno.EIO, "injected header write failure")

    monkeypatch.setattr(Journal, "_write_header", failing)
    with pytest.raises(OSError, match="injected"):
        disk.origin.checkpoint()  # the origin's fdatasync succeeded, the header did not
    monkeypatch.undo()
    disk.durable = (disk.origin_path.read_bytes(), disk.durable[1])
    for i in range(3, 8):  # would lap over the first three if their space counted as free
        disk.write(i, 1, 0x50 + i)
    disk.sync()
    disk.power_loss(keep=0)
    disk.reopen()
    disk.check()
    disk.origin.close()


def test_records_of_an_earlier_generation_are_never_replayed(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    disk.write(5, 1, 0x55)
    disk.sync()
    disk.power_loss()
    disk.reopen()  # replays the record, then starts the next generation where it ended
    assert disk.origin.journal is not None
    disk.origin.journal.advance(0)  # a header that points back at the old record
    disk.origin.close()
    with open(disk.origin_path, "r+b") as f:  # the block changed since, durably
        f.seek(5 * BLOCK)
        f.write(bytes([0x66]) * BLOCK)
    origin = Origin.open(disk.origin_path)
    assert origin.attach_journal(disk.journal_path, VID) == (0, 0)
    assert pread_full(origin.fd, BLOCK, 5 * BLOCK) == bytes([0x66]) * BLOCK
    origin.close()


def test_a_header_torn_by_a_crash_falls_back_to_the_other_slot(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    disk.write(1, 1, 0x77)
    disk.sync()
    disk.origin.checkpoint()  # moves the start past the record: a new header slot
    assert disk.origin.journal is not None
    torn = disk.origin.journal._seq % 2
    disk.origin.close()
    with open(disk.journal_path, "r+b") as f:  # as if the crash came during that write
        f.seek(torn * SLOT + 20)
        f.write(b"\xff\xff")
    origin = Origin.open(disk.origin_path)
    # the older header: the record is replayed again (harmless: the same bytes)
    assert origin.attach_journal(disk.journal_path, VID) == (1, BLOCK)
    assert pread_full(origin.fd, BLOCK, BLOCK) == bytes([0x77]) * BLOCK
    origin.close()


def test_a_damaged_record_ends_the_replay_there(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    for i in range(3):
        disk.write(i, 1, 0xA0 + i)
    disk.sync()
    disk.origin.close()
    second = RING + journal_mod.RECORD_HEADER + BLOCK + journal_mod.RECORD_HEADER + 100
    with open(disk.journal_path, "r+b") as f:
        f.seek(second)
        f.write(b"\x00\x01")
    Path(disk.origin_path).write_bytes(bytes(BLOCKS * BLOCK))  # the origin lost them all
    origin = Origin.open(disk.origin_path)
    assert origin.attach_journal(disk.journal_path, VID) == (1, BLOCK)
    assert [pread_full(origin.fd, 1, i * BLOCK)[0] for i in range(3)] == [0xA0, 0, 0]
    origin.close()


def test_a_journal_of_another_volume_or_without_a_header_is_refused(tmp_path: Path) -> None:
    disk = Disk(tmp_path)
    disk.origin.close()
    with pytest.raises(FormatError, match="another volume"):
        Journal.open(disk.journal_path, str(uuid.uuid4()))
    with open(disk.journal_path, "r+b") as f:
        f.write(bytes(2 * SLOT))
    with pytest.raises(FormatError, match="no valid header"):
        Journal.open(disk.journal_path, VID)


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"), st.integers(0, BLOCKS - 1), st.integers(1, 3), st.integers(1, 255)
        ),  # fmt: skip
        st.tuples(st.just("zero"), st.integers(0, BLOCKS - 1), st.integers(1, 3), st.booleans()),
        st.tuples(st.just("sync"), st.booleans()),
        st.tuples(st.just("crash"), st.integers(0, 2**32)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS)
def test_power_loss_at_any_point_keeps_every_synced_write(
    ops: list[tuple], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A random history of writes, zeroings, syncs, checkpoints and power losses on a small
    journal (it wraps, fills, and is bypassed by large writes): after each loss, every
    block holds its synced value or a later one."""
    saved = journal_mod.CAPACITY, journal_mod.MAX_DATA
    journal_mod.CAPACITY, journal_mod.MAX_DATA = 6 * (BLOCK + 64), 2 * BLOCK
    disk = Disk(tmp_path_factory.mktemp("j"))
    try:
        for op in ops:
            if op[0] == "write":
                disk.write(op[1], op[2], op[3])
            elif op[0] == "zero":
                disk.zero(op[1], op[2], op[3])
            elif op[0] == "sync":
                disk.sync(checkpoint=op[1])
            else:
                disk.rnd.seed(op[1])
                disk.power_loss()
                disk.reopen()
                disk.check()
        disk.power_loss()
        disk.reopen()
        disk.check()
    finally:
        journal_mod.CAPACITY, journal_mod.MAX_DATA = saved
        if not disk.origin.closed:
            disk.origin.close()
