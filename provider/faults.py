"""Named fault points, for tests that must crash, fail or slow the engine at one step.

Armed from `SHADOWBLK_FAULTS="POINT=ACTION[@N],..."` in the environment when the module is
first imported, from `serve --faults` (the same syntax), or by the `fault.arm` control
request. At the Nth hit of POINT (default: the first), once, ACTION happens:
- `crash`: the process ends at once (`os._exit(137)`, like SIGKILL: nothing flushed);
- `eio`, `enospc`: `hit` raises that OSError;
- `delay:MS`: `hit` sleeps MS milliseconds (slow storage).

Unarmed, `hit` costs one truth test of an empty dict. The points, where they are and what
they model, are listed in docs/reliability.md; `POINTS` is that list, and arming an unknown
point is an error (a typo would silently test nothing).
"""

from __future__ import annotations

import errno
import os
import threading
import time

POINTS = (
    "preserve.write",  # before a preserved chunk's data is written to the diff area
    "preserve.written",  # after it
    "preserve.sync",  # before the diff area's fdatasync of a batch
    "preserve.commit",  # before the index commit of a batch
    "preserve.committed",  # after it, before the overlay reaches the origin
    "origin.write",  # before an overlay is written to the origin
    "origin.read",  # before any read of the origin
    "origin.pwrite",  # before any write to the origin (direct, or an overlay's)
    "snapshot.sync",  # before snapshot creation makes the origin durable (writes held)
    "snapshot.commit",  # before a snapshot set's commit (origin synced, writes held)
    "snapshot.committed",  # after it, before the set is live in memory
    "delete.forget",  # before the commit that deletes (or invalidates) a snapshot
    "delete.commit",  # before the commit that frees entries (a delete's, or garbage)
    "delete.punch",  # after it, before the freed slots are punched
    "delete.release",  # after the punch, before the slots may be reused
    "revert.copy",  # before each chunk a revert copies back
    "revert.sync",  # after the copy, before the origin's fdatasync
    "revert.commit",  # after it, before the commit that ends the revert
    "flush.sync",  # before a flush makes the origin durable (journal fdatasync or checkpoint)
    "journal.append",  # before a write's record is appended to the origin journal
    "journal.sync",  # before the origin journal's fdatasync
    "checkpoint.sync",  # before a checkpoint's fdatasync of the origin
    "checkpoint.advance",  # after it, before the journal's start moves past what it covered
)
_ERRORS = {"eio": errno.EIO, "enospc": errno.ENOSPC}
_armed: dict[str, tuple[str, int]] = {}  # point -> (action, hits left before it fires)
_lock = threading.Lock()
fired: list[str] = []  # points that fired, in order (tests and stats read it)


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """{point: (action, nth)} from a spec string; ValueError if malformed."""
    result = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, action = item.partition("=")
        action, _, nth = action.partition("@")
        kind, _, ms = action.partition(":")
        valid = kind in ("crash", *_ERRORS) and not ms or kind == "delay" and ms.isdigit()
        if not sep or not valid or (nth and not nth.isdigit()) or nth == "0":
            raise ValueError(f"fault {item!r}: POINT=crash|eio|enospc|delay:MS[@N]")
        if point not in POINTS:
            raise ValueError(f"fault {item!r}: no point {point!r} (see docs/reliability.md)")
        result[point] = (action, int(nth or 1))
    return result


def arm(spec: str) -> None:
    """Arm the points of a spec string (ValueError if malformed: nothing is armed)."""
    points = parse(spec)
    with _lock:
        _armed.update(points)


def disarm() -> None:
    with _lock:
        _armed.clear()


def armed() -> dict[str, str]:
    with _lock:
        return {point: f"{action}@{left}" for point, (action, left) in _armed.items()}


def hit(point: str) -> None:
    """A fault point: does nothing unless armed."""
    if not _armed:
        return
    with _lock:
        if point not in _armed:
            return
        action, left = _armed[point]
        if left > 1:
            _armed[point] = (action, left - 1)
            return
        del _armed[point]
        fired.append(point)
    if action == "crash":
        os._exit(137)
    if action.startswith("delay:"):
        time.sleep(int(action.partition(":")[2]) / 1000)
        return
    code = _ERRORS[action]
    raise OSError(code, f"injected fault at {point}: {os.strerror(code)}")


arm(os.environ.get("SHADOWBLK_FAULTS", ""))
