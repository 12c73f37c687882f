"""Extent maps: what NBD's BLOCK_STATUS reports, for origins and snapshots.

Two maps:
- allocation (`base:allocation`): runs flagged HOLE|ZERO where the device reads as zeroes
  without storing them (a hole of the origin file, a zero entry), 0 where it holds data;
- dirty (`qemu:dirty-bitmap:VOLUME@N`): whole chunks that differ between an export and
  snapshot N, flagged 1, the others 0.

Both are built from the volume's changed chunks only (an ordered bitmap walk), so a query
costs what changed in its range, never the range's size. Functions here run under the
engine lock.
"""

from __future__ import annotations

from .api import EXTENT_HOLE, EXTENT_ZERO
from .cow import ZERO, CowVolume

HOLE = EXTENT_HOLE | EXTENT_ZERO
MAX_EXTENTS = 16384  # a reply covers at least one byte; past this many runs it stops early

Run = tuple[int, int, int]  # (start, end, flags)


def changed_chunks(vol: CowVolume, offset: int, end: int) -> list[int]:
    """Chunks in [offset, end) with index entries or pending preserves, ascending."""
    first, last = offset // vol.chunk_size, (end - 1) // vol.chunk_size
    found: list[int] = []
    for chunk in vol.changed.iter_equal_or_larger(first):
        if chunk > last or len(found) >= MAX_EXTENTS:
            break
        found.append(chunk)
    pending = [c for c in vol.pending if first <= c <= last]
    return sorted(set(found).union(pending)) if pending else found


def clip(vol: CowVolume, chunk: int, offset: int, end: int) -> tuple[int, int]:
    return max(offset, chunk * vol.chunk_size), min(end, (chunk + 1) * vol.chunk_size)


def origin_allocation(vol: CowVolume, offset: int, end: int) -> list[tuple[int, int]]:
    """`base:allocation` of the live volume: the origin's holes, pending chunks as data."""
    paint = [(*clip(vol, c, offset, end), 0) for c in vol.pending if _in(vol, c, offset, end)]
    return _painted(vol, offset, end, sorted(paint))


def snapshot_allocation(vol: CowVolume, epoch: int, offset: int, end: int) -> list[tuple[int, int]]:
    """`base:allocation` of the snapshot that opened `epoch`."""
    paint = []
    for chunk in changed_chunks(vol, offset, end):
        entry = vol.entry_for(chunk, epoch)
        if entry is not None:
            flags = HOLE if entry[1] == ZERO else 0
        elif chunk in vol.pending:  # its old bytes, or (a newer snapshot) the overlay's
            pending = vol.pending[chunk]
            flags = HOLE if pending.slot == ZERO and epoch <= pending.epoch else 0
        else:
            continue  # the snapshot reads the origin here
        paint.append((*clip(vol, chunk, offset, end), flags))
    return _painted(vol, offset, end, paint)


def dirty(vol: CowVolume, lo: int, hi: int | None, offset: int, end: int) -> list[tuple[int, int]]:
    """Chunks written in epochs [lo, hi) (hi None: up to now, pending writes included)."""
    marked = []
    for chunk in changed_chunks(vol, offset, end):
        entry = vol.entry_for(chunk, lo)  # the first entry of an epoch >= lo
        pending = vol.pending.get(chunk)
        if (entry is not None and (hi is None or entry[0] < hi)) or (
            pending is not None and lo <= pending.epoch and (hi is None or pending.epoch < hi)
        ):
            marked.append((*clip(vol, chunk, offset, end), 1))
    return _merge(_fill(marked, offset, end, 0))


def _in(vol: CowVolume, chunk: int, offset: int, end: int) -> bool:
    return offset // vol.chunk_size <= chunk <= (end - 1) // vol.chunk_size


def _painted(vol: CowVolume, offset: int, end: int, paint: list[Run]) -> list[tuple[int, int]]:
    base = [(s, s + n, 0 if data else HOLE) for s, n, data in vol.origin.extents(offset, end)]
    return _merge(_paint(base, paint))


def _fill(runs: list[Run], offset: int, end: int, flags: int) -> list[Run]:
    """Sorted disjoint runs, with the gaps of [offset, end) filled with `flags`."""
    return _paint([(offset, end, flags)], runs)


def _paint(base: list[Run], paint: list[Run]) -> list[Run]:
    """`base` (sorted, contiguous) with the sorted disjoint `paint` runs laid over it."""
    out: list[Run] = []
    i = 0
    for start, end, flags in base:
        pos = start
        while i < len(paint) and paint[i][0] < end:
            p_start, p_end, p_flags = paint[i]
            if p_start > pos:
                out.append((pos, p_start, flags))
                pos = p_start
            seg_end = min(p_end, end)
            if seg_end > pos:
                out.append((pos, seg_end, p_flags))
                pos = seg_end
            if p_end > end:
                break
            i += 1
        if pos < end:
            out.append((pos, end, flags))
    return out


def _merge(runs: list[Run]) -> list[tuple[int, int]]:
    """(length, flags) with neighbours of equal flags joined; at most MAX_EXTENTS."""
    out: list[tuple[int, int]] = []
    for start, end, flags in runs:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + end - start, flags)
        elif len(out) >= MAX_EXTENTS:
            break
        else:
            out.append((end - start, flags))
    return out
