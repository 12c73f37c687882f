"""The crash tests' shared load and write model (test_sigkill, test_fault_points, power loss).

Design note

Every 4 KiB block a writer writes is stamped with (sequence number, block number), repeated,
so any image tells which write each block holds (`decode`), and a torn or misplaced block is
an error. `Log` stamps every write's issue and acknowledgement, and every flush's start,
with one event clock per log; the checks compare those stamps:
- a snapshot is a consistent cut (`check_cut`): every block holds a write no older than the
  last one acknowledged before the create was requested, and none issued after it returned;
- a write acknowledged before a FLUSH started survives once that FLUSH completed (I2).
`writer` is the load: random blocks over NBD, a FLUSH every FLUSH_EVERY writes, until the
connection dies or it is told to stop.
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nbd

BLOCK = 4096
BLOCKS = 1024  # a 4 MiB volume: 64 chunks of 64 KiB, so chunks are hit again and again
FLUSH_EVERY = 50


def block_image(seq: int, block: int) -> bytes:
    return struct.pack("<QQ", seq, block) * (BLOCK // 16)


def decode(image: bytes) -> list[int]:
    """The write sequence number each block holds (0: never written); checks placement."""
    seqs = []
    for b in range(BLOCKS):
        raw = image[b * BLOCK : (b + 1) * BLOCK]
        seq, block = struct.unpack_from("<QQ", raw)
        if raw != block_image(seq, block) or (seq and block != b):
            if raw == bytes(BLOCK):
                seqs.append(0)
                continue
            raise AssertionError(f"block {b} holds a torn or misplaced image (seq {seq}, {block})")
        seqs.append(seq)
    return seqs


@dataclass
class Log:
    """Every write and flush, stamped with a global event counter."""

    clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # seq -> (block, issued, acked)
    writes: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    started_at: int = 0  # event time of the service's last start
    incarnations: list[int] = field(default_factory=list)  # every started_at
    # flushes that completed, per service incarnation (its started_at): the latest start.
    # A write acknowledged before it survives; one acknowledged in an earlier incarnation
    # and never flushed there may have died in the overlay with that process.
    flushed_at: dict[int, int] = field(default_factory=dict)

    def now(self) -> int:
        with self.lock:
            return next(self.clock)

    def record(self, seq: int, write: tuple[int, int, int]) -> None:
        with self.lock:
            self.writes[seq] = write

    def copy_writes(self) -> dict[int, tuple[int, int, int]]:
        """A copy to walk while the writer thread goes on recording."""
        with self.lock:
            return dict(self.writes)


def writer(
    uri: str,
    log: Log,
    seqs: itertools.count[int],
    stop: threading.Event,
    on_flush: Callable[[int], None] | None = None,
    seed: int = 0,
) -> None:
    """Write random blocks (chosen from `seed`: the same blocks in the same order for the
    same seed; where a crash falls in them is up to timing) until the connection dies or
    `stop` is set. `on_flush(start)` runs after each FLUSH returns, with the event time at
    which it was sent."""
    h = nbd.NBD()
    rnd = random.Random(seed)
    incarnation = log.started_at
    try:
        h.connect_uri(uri)
        n = 0
        while not stop.is_set():
            seq, block = next(seqs), rnd.randrange(BLOCKS)
            issued = log.now()
            log.record(seq, (block, issued, 0))
            h.pwrite(block_image(seq, block), block * BLOCK)
            log.record(seq, (block, issued, log.now()))
            n += 1
            if n % FLUSH_EVERY == 0:
                start = log.now()
                h.flush()
                log.flushed_at[incarnation] = start
                if on_flush is not None:
                    on_flush(start)
    except nbd.Error:
        return  # the service was killed under us
    finally:
        del h


def check_cut(
    seqs: list[int], log: Log, baseline: list[int], requested: int, returned: int, name: str
) -> None:
    """Every block of a snapshot holds a write consistent with when it was taken.

    `baseline` is the origin as the service found it at its last start (what survived the
    crash); writes acknowledged since then, before the create was requested, must be in.
    """
    latest_acked = dict(enumerate(baseline))
    writes = log.copy_writes()
    for seq, (block, issued, acked) in writes.items():
        if acked and acked < requested and issued > log.started_at:
            latest_acked[block] = max(latest_acked[block], seq)
    for b, seq in enumerate(seqs):
        assert seq >= latest_acked.get(b, 0), f"{name}: block {b} lost write {latest_acked[b]}"
        if seq:
            block, issued, _acked = writes[seq]
            assert issued < returned, f"{name}: block {b} holds write {seq}, issued after create"


def export_uri(state_dir: Path, export: str) -> str:
    """The NBD URI of `export` on the service of `state_dir`."""
    return f"nbd+unix:///{export}?socket={state_dir / 'nbd.sock'}"


def read_export(uri: str) -> bytes:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        return h.pread(BLOCKS * BLOCK, 0)
    finally:
        h.shutdown()
