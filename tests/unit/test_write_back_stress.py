"""Concurrent writers against the overlay's write-back (engine in-process, real files).

The preserver writes overlays back to the origin outside the engine lock, in rounds, while
writes keep landing in the chunks of its batch (preserver.py). Here eight threads write
their own 4 KiB blocks of 64 chunks, with short random pauses, while snapshots are taken
and deleted and each write-back is made a little slower (a slower origin): preserves,
write-back rounds and new writes to pending chunks overlap all the time, and some rounds
find new writes while others find none. (With the round loop of finding 5 in
docs/reliability.md, which re-checked only the chunks it had just written again, this
test failed five runs out of five.)
Checked at the end, after a FLUSH, once every preserve is applied (`settle`: a FLUSH makes
the overlays durable through the journal, not on the origin file):
- the origin file itself (read with os.pread, not through the engine) holds each block's
  last acknowledged write (I2; a write dropped with its overlay shows here);
- the engine reads the same;
- every snapshot still reads what it read right after its creation (I1);
- the catalog and the in-memory index agree (check_consistency).
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from typing import Any

from shadowblk.provider.engine import Engine
from shadowblk.provider.fsck import check_consistency

BLOCK = 4096
CHUNK = 65536
CHUNKS = 64  # enough that a round re-dirties some chunks of a batch, not all
WRITERS = 8  # each owns every WRITERS-th block
SECONDS = 3.0
SIZE = CHUNKS * CHUNK
SLOW_WRITE_BACK = 0.0003  # seconds added to each overlay's write-back
PAUSE = 0.005  # at most this long between two writes of a writer


def writer(engine: Engine, index: int, stop: threading.Event, last: dict[int, bytes]) -> None:
    dev = engine.open_export("v")
    rng = random.Random(index)
    blocks = range(index, SIZE // BLOCK, WRITERS)
    try:
        while not stop.is_set():
            block = rng.choice(blocks)
            data = rng.randbytes(BLOCK)
            dev.write(block * BLOCK, data)
            last[block] = data
            time.sleep(rng.random() * PAUSE)  # some rounds find nothing new, some do
    finally:
        dev.close()


def digest(engine: Engine, name: str) -> str:
    dev = engine.open_export(name)
    try:
        return hashlib.sha256(dev.pread(0, dev.size)).hexdigest()
    finally:
        dev.close()


def slow_origin(engine: Engine) -> None:
    """Each overlay's write-back takes a little longer (a slower origin disk): the writers
    get to write into the chunks of a batch while it is being written back."""
    vol = engine._volumes["v"]
    real = vol.write_back

    def write_back(pending: Any, ranges: Any) -> Any:
        time.sleep(SLOW_WRITE_BACK)
        return real(pending, ranges)

    vol.write_back = write_back  # type: ignore[method-assign]


def test_concurrent_writes_during_write_back_all_reach_the_origin(engine: Engine) -> None:
    engine.create_volume("v", size=SIZE)
    engine.create_snapshot_set(["v"])
    slow_origin(engine)
    stop = threading.Event()
    last: dict[int, bytes] = {}
    threads = [
        threading.Thread(target=writer, args=(engine, i, stop, last)) for i in range(WRITERS)
    ]
    for t in threads:
        t.start()
    digests: dict[str, str] = {}
    try:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            (snap,) = engine.create_snapshot_set(["v"])
            digests[snap.name] = digest(engine, snap.name)
            if len(digests) > 4:  # delete one of the middle: reclaim runs meanwhile too
                name = sorted(digests, key=lambda n: int(n.split("@")[1]))[1]
                engine.delete_snapshot(name)
                del digests[name]
    finally:
        stop.set()
        for t in threads:
            t.join()
    engine.flush()
    engine.settle()
    assert len(last) > CHUNKS, "the writers wrote almost nothing"
    path = engine._volumes["v"].origin.path
    with open(path, "rb") as origin:
        on_disk = origin.read()
    lost = [b for b, data in last.items() if on_disk[b * BLOCK : (b + 1) * BLOCK] != data]
    assert not lost, f"acknowledged writes missing from the origin file at blocks {lost[:8]}"
    dev = engine.open_export("v")
    try:
        assert dev.pread(0, SIZE) == on_disk
    finally:
        dev.close()
    changed = [name for name, d in digests.items() if digest(engine, name) != d]
    assert not changed, f"snapshots whose bytes changed: {changed}"
    assert check_consistency(engine) == []
