"""The replayer: crash states from the recorder's log, and their disk images.

Design note

The log (recorder.py) is a sequence of records, WRITE (offset, data) or FLUSH. A disk with
a volatile write cache, losing power, keeps every write acknowledged before the last FLUSH
that completed, and any subset of the writes after it. So a crash state is:
- `durable`: the records [0, durable) are all on the disk, and record durable-1 is a FLUSH
  (a *prefix state*), plus
- `extra`: some of the WRITE records between that FLUSH and the next one (a *subset
  state*; empty for a prefix state).
`horizon` is one past the last record on the disk: nothing the recorded run did at or after
event `horizon` can show in the state; everything it made durable before `durable` must.

`choose_states` takes every FLUSH at or after `start` as a prefix state (a seeded sample
when they are more than half of `count`, half of it from FLUSHes inside the event ranges
where a snapshot create or delete was in flight), and fills up to `count` with subset
states: a seeded random FLUSH (half the time one in such a range), a random non-empty
subset of the writes between it and the next FLUSH.

`Materialiser` builds the image of a state, in a scratch directory on tmpfs (removed by
`close`): it keeps a prefix image that only moves forward (states are built in ascending
`durable`), copies it sparsely (SEEK_DATA and SEEK_HOLE: the cost is the data, not the disk
size), and writes the extras on the copy. `dropped` (for the tests that prove
the checker fails) rebuilds from the base image without those records.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from recorder import FLUSH, RECORD, WRITE

COPY_PIECE = 1 << 20


@dataclass(frozen=True)
class Record:
    kind: int
    offset: int
    length: int
    pos: int  # where its data starts in LOG.dat


def read_log(log: Path) -> list[Record]:
    raw = Path(f"{log}.idx").read_bytes()
    records, pos = [], 0
    for kind, offset, length in RECORD.iter_unpack(raw):
        records.append(Record(kind, offset, length, pos))
        pos += length
    return records


@dataclass(frozen=True, order=True)
class CrashState:
    durable: int
    extra: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()

    @property
    def horizon(self) -> int:
        return max(self.extra) + 1 if self.extra else self.durable

    def describe(self) -> str:
        text = f"prefix of {self.durable} records"
        if self.extra:
            text += f" + {len(self.extra)} later writes {list(self.extra)}"
        if self.dropped:
            text += f" - records {list(self.dropped)}"
        return text


def flush_points(records: Sequence[Record], start: int) -> list[int]:
    """Every `durable` of a prefix state at or after event `start`."""
    return [i + 1 for i, r in enumerate(records) if r.kind == FLUSH and i + 1 >= start]


def window(records: Sequence[Record], durable: int) -> list[int]:
    """The WRITE records after the FLUSH ending at `durable`, up to the next FLUSH."""
    found = []
    for i in range(durable, len(records)):
        if records[i].kind == FLUSH:
            break
        found.append(i)
    return found


def choose_states(
    records: Sequence[Record],
    start: int,
    count: int,
    rnd: random.Random,
    focus: Sequence[tuple[int, int]] = (),
) -> list[CrashState]:
    """About `count` states (fewer if the log has fewer); see the module note. Half the
    sampled prefixes and half the subsets end inside a `focus` range (lo, hi]: the event
    ranges in which an operation was in flight."""
    points = flush_points(records, start)
    focused = [d for d in points if any(lo < d <= hi for lo, hi in focus)]
    chosen = _sample(points, focused, count // 2, rnd)
    states = {CrashState(d) for d in chosen}
    windows = [(d, w) for d in points if (w := window(records, d))]
    hot = [(d, w) for d, w in windows if any(lo < d <= hi for lo, hi in focus)]
    tries = 0
    while windows and len(states) < count and tries < 50 * count:
        tries += 1
        durable, writes = rnd.choice(hot if hot and rnd.random() < 0.5 else windows)
        extra = rnd.sample(writes, rnd.randint(1, len(writes)))
        states.add(CrashState(durable, tuple(sorted(extra))))
    return sorted(states)


def _sample(points: list[int], focused: list[int], budget: int, rnd: random.Random) -> set[int]:
    """All of `points` if they fit in `budget`; else up to half from `focused`, the rest
    from all."""
    if len(points) <= budget:
        return set(points)
    chosen = set(rnd.sample(focused, min(len(focused), budget // 2)))
    rest = [d for d in points if d not in chosen]
    return chosen | set(rnd.sample(rest, budget - len(chosen)))


def scratch_dir(image_size: int) -> str | None:
    """tmpfs if there is one with room for two images (a prefix and a state): freeing and
    fsyncing a disk-backed image costs ~0.5 s a state. Else the default temporary
    directory (a container's small /dev/shm must not turn into ENOSPC)."""
    if not os.path.isdir("/dev/shm"):
        return None
    return "/dev/shm" if shutil.disk_usage("/dev/shm").free > 2 * image_size else None


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` (replaced, not truncated), leaving holes where `src` has them."""
    dst.unlink(missing_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break  # no data after offset
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fout.fileno(), data, hole - data)
            offset = hole


def _copy_range(fd_in: int, fd_out: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        data = os.pread(fd_in, min(COPY_PIECE, end - offset), offset)
        if not data:
            raise OSError(f"unexpected end of file at {offset}")
        os.pwrite(fd_out, data, offset)
        offset += len(data)


class Materialiser:
    """Disk images of crash states, built incrementally; see the module note."""

    def __init__(self, base: Path, log: Path, records: Sequence[Record]) -> None:
        self.base = base
        self.records = records
        scratch = scratch_dir(base.stat().st_size)
        self.workdir = Path(tempfile.mkdtemp(prefix="sbk-replay-", dir=scratch))
        self.prefix = self.workdir / "prefix.img"
        self.image = self.workdir / "state.img"
        self.applied = 0
        try:
            sparse_copy(base, self.prefix)
            self.dat = os.open(f"{log}.dat", os.O_RDONLY)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def close(self) -> None:
        os.close(self.dat)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def build(self, state: CrashState) -> Path:
        """The image of `state`, at `self.image` (overwritten by the next build)."""
        if state.dropped:
            sparse_copy(self.base, self.image)
            skip = set(state.dropped)
            self._apply(self.image, [i for i in range(state.durable) if i not in skip])
        else:
            if state.durable < self.applied:
                raise ValueError("states must be built in ascending order of `durable`")
            self._apply(self.prefix, range(self.applied, state.durable))
            self.applied = state.durable
            sparse_copy(self.prefix, self.image)
        self._apply(self.image, state.extra)
        return self.image

    def data(self, index: int) -> bytes:
        r = self.records[index]
        return os.pread(self.dat, r.length, r.pos)

    def _apply(self, image: Path, indices: Sequence[int]) -> None:
        fd = os.open(image, os.O_WRONLY)
        try:
            for i in indices:
                r = self.records[i]
                if r.kind == WRITE:
                    os.pwrite(fd, self.data(i), r.offset)
        finally:
            os.close(fd)
