"""Snapshot creation under concurrent writers takes a clean cut (engine in-process).

Four threads write their own 4 KiB blocks without pause, each write's image naming its
global sequence number, while the main thread takes snapshots one after another. For
every snapshot and block, what the snapshot holds must be the last write to that block
acknowledged before the creation was requested, or a later one that was already under
way when the creation returned (a write in flight may fall on either side), never one
that started after, never an older one. Each snapshot is also read right after its
creation and again at the end, and must not have changed (I1). The writers write without
pause, so creations find preserves pending and have them to drain (taking the drain out
makes this test fail at once).
"""

from __future__ import annotations

import itertools
import random
import struct
import threading
import time

from shadowblk.provider.engine import Engine

BLOCK = 4096
CHUNK = 16384
BLOCKS = 512  # a 2 MiB volume of 128 chunks
WRITERS = 4  # writer i owns the blocks b with b % WRITERS == i
SNAPSHOTS = 20

Write = tuple[int, float, float]  # (sequence number, started, acknowledged): monotonic


def image(seq: int, block: int) -> bytes:
    return struct.pack("<QQ", seq, block) * (BLOCK // 16)


def seq_of(data: bytes, block: int) -> int:
    """The sequence number a block holds (0: never written); a torn block fails."""
    if data == bytes(BLOCK):
        return 0
    seq, where = struct.unpack_from("<QQ", data)
    assert (where, data) == (block, image(seq, block)), f"block {block} is torn or misplaced"
    return seq


def writer(
    engine: Engine,
    index: int,
    seqs: itertools.count[int],
    stop: threading.Event,
    log: dict[int, list[Write]],
) -> None:
    dev = engine.open_export("v")
    rng = random.Random(index)
    mine = range(index, BLOCKS, WRITERS)
    try:
        while not stop.is_set():
            block, seq = rng.choice(mine), next(seqs)
            started = time.monotonic()
            dev.write(block * BLOCK, image(seq, block))
            log[block].append((seq, started, time.monotonic()))
    finally:
        dev.close()


def allowed(writes: list[Write], requested: float, returned: float) -> set[int]:
    """The sequence numbers a block may hold in a snapshot created in [requested, returned]."""
    done = [seq for seq, _, acked in writes if acked < requested]
    after = [seq for seq, started, acked in writes if acked >= requested and started < returned]
    return {done[-1] if done else 0, *after}


def read_all(engine: Engine, name: str) -> bytes:
    dev = engine.open_export(name)
    try:
        return dev.pread(0, dev.size)
    finally:
        dev.close()


def test_snapshots_under_concurrent_writers_take_a_clean_cut(engine: Engine) -> None:
    engine.create_volume("v", size=BLOCKS * BLOCK, chunk_size=CHUNK)
    seqs = itertools.count(1)
    stop = threading.Event()
    log: dict[int, list[Write]] = {b: [] for b in range(BLOCKS)}
    threads = [
        threading.Thread(target=writer, args=(engine, i, seqs, stop, log))
        for i in range(WRITERS)
    ]
    for t in threads:
        t.start()
    taken: list[tuple[str, float, float, bytes]] = []
    rng = random.Random(7)
    try:
        for _ in range(SNAPSHOTS):
            time.sleep(rng.uniform(0.005, 0.03))  # let the overlay fill again
            requested = time.monotonic()
            name = engine.create_snapshot_set(["v"])[0].name
            returned = time.monotonic()
            taken.append((name, requested, returned, read_all(engine, name)))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert sum(len(w) for w in log.values()) > 10 * SNAPSHOTS, "the writers hardly wrote"
    for name, requested, returned, first in taken:
        assert read_all(engine, name) == first, f"{name} changed after its creation (I1)"
        for block in range(BLOCKS):
            held = seq_of(first[block * BLOCK : (block + 1) * BLOCK], block)
            ok = allowed(log[block], requested, returned)
            assert held in ok, f"{name} block {block}: write {held}, allowed {sorted(ok)}"
