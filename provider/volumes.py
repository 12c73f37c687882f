"""Provisioning a volume: checking its arguments, making or adopting its origin, making its
diff area, and undoing all of that. The engine records the result in the catalog.

Identity rules (DESIGN.md "Exclusivity and identity"): an origin is adopted by one volume
only (checked by device and inode before it is opened, then enforced by its lock); a diff
area is a new directory named after the volume's UUID, marked as such.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .diffarea import DiffArea
from .errors import InvalidArgument, Locked
from .journal import NAME as JOURNAL
from .origin import Origin

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FULL_POLICIES = ("delete-oldest", "invalidate", "fail-writes")
DEFAULT_CHUNK_SIZE = 64 * 1024
DEFAULT_MAX_SNAPSHOTS = 512  # per volume, as VSS
MAX_SNAPSHOTS_LIMIT = 65536


@dataclass(frozen=True)
class VolumeSpec:
    """What `volume create` asks for."""

    name: str
    size: int | None = None
    backing: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    diff_area: str | None = None
    max_diff: int | str | None = None  # bytes, or "N%" of the volume's size
    full_policy: str = "delete-oldest"
    sparse: bool = False
    max_snapshots: int = DEFAULT_MAX_SNAPSHOTS

    def validate(self) -> None:
        if not NAME_RE.match(self.name):
            raise InvalidArgument(
                f"invalid volume name {self.name!r}: 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if self.size is not None and (self.size <= 0 or self.size % 512):
            raise InvalidArgument(f"size {self.size} must be a positive multiple of 512 bytes")
        if self.backing is None and self.size is None:
            raise InvalidArgument("a new volume needs --size (or --backing PATH to adopt)")
        cs = self.chunk_size
        if cs & (cs - 1) or not 4096 <= cs <= 1 << 20:
            raise InvalidArgument(f"chunk size {cs} must be a power of two, 4K to 1M")
        check_limits(self.max_diff, self.full_policy, self.max_snapshots)


def check_limits(
    max_diff: int | str | None, full_policy: str | None, max_snapshots: int | None
) -> None:
    """The settings `volume create` and `volume set` share."""
    if max_diff is not None:
        resolve_max_diff(max_diff, 1)
    if full_policy is not None and full_policy not in FULL_POLICIES:
        raise InvalidArgument(f"full policy must be one of {', '.join(FULL_POLICIES)}")
    if max_snapshots is not None and not 1 <= max_snapshots <= MAX_SNAPSHOTS_LIMIT:
        raise InvalidArgument(f"max snapshots must be 1 to {MAX_SNAPSHOTS_LIMIT}")


def resolve_max_diff(value: int | str, size: int) -> int:
    """--max-diff in bytes: an integer as it is, "N%" of `size` (0 < N <= 100)."""
    if isinstance(value, str):
        number = value.removesuffix("%")
        try:
            percent = float(number)
        except ValueError:
            percent = -1.0
        if not value.endswith("%") or not 0 < percent <= 100:
            raise InvalidArgument(f"--max-diff {value!r}: bytes, or a percentage like 10%")
        return max(1, int(size * percent / 100))
    if value <= 0:
        raise InvalidArgument("--max-diff must be positive")
    return value


@dataclass
class Provisioned:
    origin: Origin
    owned: bool  # shadowblk created the origin file (and removes it with the volume)
    diff: DiffArea

    def discard(self) -> None:
        """Undo provisioning: close and remove what was made (an adopted origin stays)."""
        self.diff.close()
        shutil.rmtree(self.diff.path, ignore_errors=True)
        discard_origin(self.origin, self.owned)


def provision(
    spec: VolumeSpec, vid: str, state_dir: Path, others: Iterable[tuple[str, Origin]]
) -> Provisioned:
    """Make (or adopt) the origin and make the diff area of a new volume with UUID `vid`."""
    origin, owned = _make_origin(spec, vid, state_dir, others)
    try:
        diff = _make_diff_area(vid, spec.chunk_size, spec.diff_area, state_dir)
    except BaseException:
        discard_origin(origin, owned)
        raise
    made = Provisioned(origin, owned, diff)
    try:
        origin.attach_journal(diff.path / JOURNAL, vid)
    except BaseException:
        made.discard()
        raise
    return made


def discard_origin(origin: Origin, owned: bool) -> None:
    origin.close()
    if owned:
        origin.path.unlink(missing_ok=True)


def _make_origin(
    spec: VolumeSpec, vid: str, state_dir: Path, others: Iterable[tuple[str, Origin]]
) -> tuple[Origin, bool]:
    if spec.backing is None:
        assert spec.size is not None
        vdir = state_dir / "volumes"
        vdir.mkdir(exist_ok=True, mode=0o700)
        try:
            return Origin.create(vdir / f"{vid}.img", spec.size, spec.sparse), True
        except OSError as e:
            raise InvalidArgument(f"cannot create a {spec.size}-byte origin: {e.strerror}") from e
    path = Path(spec.backing).absolute()
    _check_not_adopted(path, others)
    origin = Origin.open(path)
    try:
        _check_adoptable(origin, spec.size)
    except BaseException:
        origin.close()
        raise
    return origin, False


def _check_not_adopted(path: Path, others: Iterable[tuple[str, Origin]]) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidArgument(f"cannot adopt {path}: {e.strerror}") from e
    ident = (st.st_rdev, 0) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
    for name, origin in others:
        if origin.identity() == ident:
            raise Locked(f"origin {path} is already volume {name}")


def _check_adoptable(origin: Origin, size: int | None) -> None:
    if size is not None and size != origin.size:
        raise InvalidArgument(
            f"--size {size} does not match {origin.path}, which is {origin.size} bytes"
        )
    if origin.size == 0 or origin.size % 512:
        raise InvalidArgument(f"origin {origin.path} must be a non-zero multiple of 512 bytes")


def _make_diff_area(vid: str, chunk_size: int, parent: str | None, state_dir: Path) -> DiffArea:
    base = Path(parent).absolute() if parent else state_dir / "diff"
    if parent is None:
        base.mkdir(exist_ok=True, mode=0o700)
    elif not base.is_dir():
        raise InvalidArgument(f"diff area {base} is not a directory")
    return DiffArea.create(base / vid, vid, chunk_size)
