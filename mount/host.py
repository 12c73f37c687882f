"""What the host sees of the FUSE files: loop devices over them and filesystems on those.

Everything is read from the kernel (`/sys/block/loop*/loop/backing_file`,
`/proc/self/mountinfo`), never remembered: after a SIGKILL the truth is still there, and
`list` cannot disagree with `mount`. The commands (losetup, mount, umount) always run in
child processes, never in the service's FUSE thread (a mount over a FUSE file from the
process that serves it deadlocks).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Loop:
    device: str  # /dev/loopN
    backing: str  # the file it is attached to
    mountpoints: tuple[str, ...]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str]]:
    """(major:minor, mountpoint, source) of every mount, from /proc/self/mountinfo."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            result.append((fields[2], _unescape(fields[4]), _unescape(fields[dash + 2])))
    return result


def loops_under(directory: Path) -> list[Loop]:
    """Loop devices whose backing file is in `directory`, with their mountpoints."""
    prefix = str(directory).rstrip("/") + "/"
    by_dev: dict[str, list[str]] = {}  # by major:minor, and by source (btrfs reports an
    for devno, mountpoint, source in mounts():  # anonymous major:minor, the loop as source)
        by_dev.setdefault(devno, []).append(mountpoint)
        if source.startswith("/dev/loop"):
            by_dev.setdefault(source, []).append(mountpoint)
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
            devno = (entry / "dev").read_text().strip()
        except OSError:
            continue
        backing = backing.removesuffix(" (deleted)")
        if backing.startswith(prefix):
            device = f"/dev/{entry.name}"
            points = dict.fromkeys(by_dev.get(devno, []) + by_dev.get(device, []))
            found.append(Loop(device, backing, tuple(points)))
    return found


def is_mountpoint(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(mountpoint == target for _, mountpoint, _ in mounts())


def where_mounted(fuse_dir: Path) -> dict[str, list[str]]:
    """Export name -> mountpoints of filesystems on loop devices over its FUSE file (a
    recovery overlay counts for its snapshot)."""
    result: dict[str, list[str]] = {}
    for loop in loops_under(fuse_dir):
        name = Path(loop.backing).name
        if name.startswith(".") and ".recover-" in name:
            name = name[1:].rpartition(".recover-")[0]
        result.setdefault(name, []).extend(loop.mountpoints)
    return result


def cleanup_commands(fuse_dir: Path) -> list[list[str]]:
    """What to run, in order, to clear what a dead service left over `fuse_dir`: lazy
    unmounts of the filesystems on its loop devices, the detaches, the FUSE unmount."""
    commands: list[list[str]] = []
    loops = loops_under(fuse_dir)
    for loop in loops:
        commands += [["umount", "--lazy", mountpoint] for mountpoint in loop.mountpoints]
    commands += [["losetup", "--detach", loop.device] for loop in loops]
    if is_mountpoint(fuse_dir):
        commands.append(["umount", "--lazy", str(fuse_dir)])
    return commands


def run(argv: list[str]) -> str:
    """Run a command (in the CLI process); its stdout. RuntimeError with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise RuntimeError(f"{' '.join(argv)}: {detail}")
    return proc.stdout
