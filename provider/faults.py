"""Named fault points, for tests that must crash or fail the engine at a precise step.

`SHADOWBLK_FAULTS="POINT=ACTION[@N],..."` in the environment arms them when the module is
first imported: at the Nth hit (default the first) of POINT, ACTION happens:
- `crash`: the process ends at once (`os._exit(137)`, like a SIGKILL: nothing flushed);
- `eio`, `enospc`: `hit` raises that OSError.

Unarmed, `hit` is one dict look-up. Points so far: `revert.copy` (before each chunk a
revert copies back); `preserve.write` (before a preserved chunk's data is written),
`preserve.sync` (before the diff area's fdatasync), `preserve.commit` (before the index
commit). docs/reliability.md (issue 7) will list them all.
"""

from __future__ import annotations

import errno
import os

_ERRORS = {"eio": errno.EIO, "enospc": errno.ENOSPC}
_armed: dict[str, tuple[str, int]] = {}  # point -> (action, hits left before it fires)


def arm(spec: str) -> None:
    """Arm points from a SHADOWBLK_FAULTS string (ValueError if malformed)."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, sep, action = item.partition("=")
        action, _, nth = action.partition("@")
        if not sep or action not in ("crash", *_ERRORS) or (nth and not nth.isdigit()):
            raise ValueError(f"SHADOWBLK_FAULTS: cannot read {item!r} (POINT=ACTION[@N])")
        _armed[point] = (action, int(nth or 1))


def disarm() -> None:
    _armed.clear()


def hit(point: str) -> None:
    """A fault point: does nothing unless armed."""
    if not _armed or point not in _armed:
        return
    action, left = _armed[point]
    if left > 1:
        _armed[point] = (action, left - 1)
        return
    del _armed[point]
    if action == "crash":
        os._exit(137)
    code = _ERRORS[action]
    raise OSError(code, f"injected fault at {point}: {os.strerror(code)}")


arm(os.environ.get("SHADOWBLK_FAULTS", ""))
