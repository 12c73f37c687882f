"""The power-loss checker: what a recorded run promised, checked in one crash state.

Design note

`Expectations` is what the recorded run learnt while it ran, every promise stamped with the
recorder's event count (`RecordedDisk.events()`) read before the request was sent or after
its reply came back:
- each snapshot set: its members, `requested` (before), `confirmed` (after); each member's
  sha256 as read over NBD right after the create returned, and for a deleted one, when its
  delete was sent and confirmed;
- each volume: its write log (crashload.Log) and its completed FLUSHes as (the Log clock
  when the FLUSH was sent, the event count after it returned).

A state (replay.CrashState) holds every record below `durable` and none at or after
`horizon`. `check_crash_state` mounts its image (ext4 replays its journal); `check_state`
opens the engine on it, in this process, and lists violations:
- the engine refuses to open, a volume is unavailable, or fsck finds the index and the
  catalog apart;
- I1/I3: a set confirmed before `durable` misses a member whose delete had not been sent
  before `horizon`; a set with any member present misses another (all or none); a listed
  snapshot reads other bytes than at its creation (read through the engine); a snapshot
  listed that was never created (or before its creation was requested), or whose delete
  was confirmed before `durable`;
- I2: a volume's origin misses a write acknowledged before a FLUSH that completed before
  `durable` (its block must hold that write or a later one), or holds a torn block.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from crashload import Log, decode
from powerdisk import CommandFailed, mounted_image
from replay import CrashState, Materialiser

from shadowblk.provider.engine import Engine
from shadowblk.provider.fsck import check_consistency

MAX_PER_KIND = 5  # lost writes reported per volume and state, beyond which only a count


@dataclass
class SnapshotRecord:
    sha256: str
    delete_sent: int | None = None
    delete_confirmed: int | None = None

    def may_be_gone(self, horizon: int) -> bool:
        return self.delete_sent is not None and self.delete_sent < horizon

    def must_be_gone(self, durable: int) -> bool:
        return self.delete_confirmed is not None and self.delete_confirmed <= durable


@dataclass
class SetRecord:
    names: tuple[str, ...]
    requested: int
    confirmed: int


@dataclass
class VolumeRecord:
    log: Log = field(default_factory=Log)
    flushes: list[tuple[int, int]] = field(default_factory=list)  # (Log clock, events after)


@dataclass
class Expectations:
    volumes: dict[str, VolumeRecord]
    sets: list[SetRecord] = field(default_factory=list)
    snapshots: dict[str, SnapshotRecord] = field(default_factory=dict)

    def in_flight(self) -> list[tuple[int, int]]:
        """The event ranges in which a create or a delete was under way."""
        ranges = [(s.requested, s.confirmed) for s in self.sets]
        return ranges + [
            (r.delete_sent, r.delete_confirmed)
            for r in self.snapshots.values()
            if r.delete_sent is not None and r.delete_confirmed is not None
        ]


def check_crash_state(
    mat: Materialiser,
    state: CrashState,
    mountpoint: Path,
    exp: Expectations,
    seen: Counter[str] | None = None,
) -> list[str]:
    """Build `state`'s image, mount it at `mountpoint`, check it; its violations."""
    image = mat.build(state)
    try:
        with mounted_image(image, mountpoint):
            return check_state(mountpoint, exp, state.durable, state.horizon, seen)
    except CommandFailed as e:
        return [f"the filesystem does not mount: {e}"]


def check_state(
    state_dir: Path,
    exp: Expectations,
    durable: int,
    horizon: int,
    seen: Counter[str] | None = None,
) -> list[str]:
    """Every violation of I1-I3 the engine shows on this state (an empty list: none);
    `seen` counts the outcomes of the operations in flight in it."""
    try:
        engine = Engine.open(state_dir)
    except Exception as e:
        return [f"the engine refused to open: {e!r}"]
    try:
        listed = {s.name for s in engine.snapshots()}
        if seen is not None:
            tally(exp, listed, durable, horizon, seen)
        return check_engine(engine, exp, listed, durable, horizon)
    except Exception as e:  # a check that cannot even run is a violation too
        return [f"checking the state failed: {e!r}"]
    finally:
        engine.close()


def check_engine(
    engine: Engine, exp: Expectations, listed: set[str], durable: int, horizon: int
) -> list[str]:
    problems = [f"volume {n} is unavailable: {why}" for n, why in engine.unavailable.items()]
    problems += [f"fsck: {p}" for p in check_consistency(engine)]
    problems += check_sets(exp, listed, durable, horizon)
    problems += [p for n in sorted(listed) for p in check_bytes(engine, exp, n)]
    for name, vol in exp.volumes.items():
        if name not in engine.unavailable:
            problems += check_origin(engine, vol, name, durable)
    return problems


def tally(
    exp: Expectations, listed: set[str], durable: int, horizon: int, seen: Counter[str]
) -> None:
    """Count what became of the creates and deletes in flight in this state."""
    for s in exp.sets:
        if s.requested < horizon and durable < s.confirmed:
            seen["create in flight: " + ("kept" if set(s.names) & listed else "gone")] += 1
    for name, r in exp.snapshots.items():
        if r.may_be_gone(horizon) and not r.must_be_gone(durable):
            seen["delete in flight: " + ("kept" if name in listed else "gone")] += 1


def check_sets(exp: Expectations, listed: set[str], durable: int, horizon: int) -> list[str]:
    problems = [f"{n} is listed but was never created" for n in listed - set(exp.snapshots)]
    for s in exp.sets:
        present = [n for n in s.names if n in listed]
        if present and horizon <= s.requested:
            problems.append(f"{present} exist before their creation was requested")
        if present or durable >= s.confirmed:  # the set exists: all of it (I3)
            snaps = {n: exp.snapshots[n] for n in s.names}
            lost = [n for n, r in snaps.items() if n not in listed and not r.may_be_gone(horizon)]
            if lost:
                why = "confirmed" if durable >= s.confirmed else f"partial set, {present} present"
                problems.append(f"snapshots lost ({why}): {lost} (I1/I3)")
            back = [n for n in present if snaps[n].must_be_gone(durable)]
            if back:
                problems.append(f"deleted snapshots came back: {back}")
    return problems


def check_bytes(engine: Engine, exp: Expectations, name: str) -> list[str]:
    record = exp.snapshots.get(name)
    if record is None:
        return []
    try:
        device = engine.open_export(name)
        try:
            data = device.pread(0, device.size)
        finally:
            device.close()
    except Exception as e:
        return [f"{name} cannot be read: {e!r} (I1)"]
    if hashlib.sha256(data).hexdigest() != record.sha256:
        return [f"{name} reads other bytes than at its creation (I1)"]
    return []


def check_origin(engine: Engine, vol: VolumeRecord, name: str, durable: int) -> list[str]:
    flushed = [clock for clock, events in vol.flushes if events <= durable]
    if not flushed:
        return []
    device = engine.open_export(name)
    try:
        image = bytes(device.pread(0, device.size))
    finally:
        device.close()
    try:
        blocks = decode(image)
    except AssertionError as e:
        return [f"origin {name}: {e}"]
    before = max(flushed)
    lost = [
        f"write {seq} to block {block}"
        for seq, (block, _issued, acked) in sorted(vol.log.copy_writes().items())
        if acked and acked < before and blocks[block] < seq
    ]
    if not lost:
        return []
    more = f" and {len(lost) - MAX_PER_KIND} more" if len(lost) > MAX_PER_KIND else ""
    return [f"origin {name} lost flushed {', '.join(lost[:MAX_PER_KIND])}{more} (I2)"]
