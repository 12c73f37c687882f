"""An fsck of the engine's state, for tests and (later) `shadowblk verify`.

Checks, per volume, once the preserves queued so far are applied, under the engine lock:
the in-memory index equals the catalog's rows; every diff slot is referenced at most once
and never also free; every entry is needed by a live snapshot (the freeing rule of
DESIGN.md leaves none behind).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cow import ZERO, CowVolume

if TYPE_CHECKING:
    from .engine import Engine


def check_consistency(engine: Engine) -> list[str]:
    """The problems found (an empty list when the state is consistent)."""
    problems: list[str] = []
    engine.settle()
    with engine._lock:
        for vol in engine._volumes.values():
            problems += _check_volume(engine, vol)
    return problems


def _check_volume(engine: Engine, vol: CowVolume) -> list[str]:
    problems = []
    rows = {
        (c, e): (ZERO if s is None else s, h) for c, e, s, h in engine.catalog.iter_chunks(vol.id)
    }
    mem = {(c, e[0]): (e[1], e[2]) for c, es in vol.index.items() for e in es}
    if rows != mem:
        problems.append(f"{vol.name}: catalog and memory index differ ({len(rows)} vs {len(mem)})")
    slots = [s for s, _h in mem.values() if s != ZERO]
    if len(slots) != len(set(slots)):
        problems.append(f"{vol.name}: a diff slot is used twice")
    if any(s in vol.diff.free for s in slots):
        problems.append(f"{vol.name}: a used slot is on the free list")
    for chunk, entries in vol.index.items():
        for i in range(len(entries)):
            if not vol.entry_needed(entries, i):
                problems.append(f"{vol.name}: chunk {chunk} epoch {entries[i][0]} is not needed")
    return problems
