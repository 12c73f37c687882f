"""A fixed list of 4 KiB writes at a fixed queue depth, through libnbd's aio API.

For the copy-on-write random first writes: one write into every chunk, each chunk once,
which fio cannot generate (its random map cannot align offsets to the chunk while writing
less than one) and cannot replay over NBD either: fio 3.33's iolog replay with the nbd
engine closes the connection without waiting for the replies in flight, its FLUSH's
included (a shadowblk service still had preserves pending after such a "flushed" run).
The same driver runs against every server. Its own ceiling, measured against nbdkit's
file plugin here, is ~60 k IOPS: well above the copy-on-write rates it measures.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import nbd

from .volumes import BLOCK, CHUNK


@dataclass(frozen=True)
class Timed:
    writes: int
    seconds: float  # from the first write to the reply of the final FLUSH

    @property
    def iops(self) -> float:
        return self.writes / self.seconds


def first_write_offsets(size: int, seed: int = 2) -> list[int]:
    """One offset in every `CHUNK` of `size` bytes, chunks in random order, each at a
    random 4 KiB block of its chunk."""
    rng = random.Random(seed)
    chunks = list(range(size // CHUNK))
    rng.shuffle(chunks)
    blocks = CHUNK // BLOCK
    return [c * CHUNK + rng.randrange(blocks) * BLOCK for c in chunks]


def write_all(uri: str, offsets: list[int], depth: int = 8) -> Timed:
    """Write 4 KiB at each offset, `depth` writes in flight, then FLUSH; time it all."""
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        block = nbd.Buffer.from_bytearray(bytearray(random.Random(9).randbytes(BLOCK)))
        errors: list[int] = []

        def done(error: int) -> int:
            if error:
                errors.append(error)
            return 1  # retire the command

        pending = iter(offsets)
        exhausted = False
        t0 = time.perf_counter()
        while True:
            while not exhausted and handle.aio_in_flight() < depth:
                offset = next(pending, None)
                if offset is None:
                    exhausted = True
                else:
                    handle.aio_pwrite(block, offset, completion=done)
            if exhausted and handle.aio_in_flight() == 0:
                break
            handle.poll(-1)
        handle.flush()
        seconds = time.perf_counter() - t0
        if errors:
            raise RuntimeError(f"{len(errors)} writes failed on {uri} (errno {errors[0]})")
        return Timed(len(offsets), seconds)
    finally:
        handle.shutdown()
