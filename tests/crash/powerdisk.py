"""Host side of the power-loss test: a recorded disk, and crash-state images mounted on it.

Design note

`RecordedDisk` (a context manager) builds, in its work directory:
1. `base.img`: a sparse file with a fresh ext4 (4 KiB blocks; inode tables and journal
   zeroed by mkfs, so no lazy-init thread writes later; no discard);
2. `work.img`: a sparse copy of it, the recorder's backing file;
3. the recorder (recorder.py) in its own process, FUSE at `fuse/`, logging to `log.*`;
4. a loop device over `fuse/disk` with direct I/O (its flushes reach FUSE as fsync),
   the ext4 mounted at `mnt/`.
The test puts a whole state directory on `mnt/`. Teardown always runs, in order, each step
even if one before failed: the `before_unmount` callbacks (stopping the service), the ext4
unmount, the loop detach, the FUSE unmount (the recorder then closes its log and exits).

`mounted_image` mounts one materialised crash state at the same `mnt/` (the catalog stores
absolute paths) on a plain loop device: mount replays the ext4 journal, as a reboot would.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from shadowblk.mount.host import mounts

RECORDER = Path(__file__).with_name("recorder.py")
READY_TIMEOUT = 30.0


class CommandFailed(RuntimeError):
    pass


def sh(*argv: str, timeout: float = 120) -> str:
    """Run a command; its stdout. CommandFailed with its stderr on a non-zero exit."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def missing_host_support() -> str | None:
    """Why this host cannot run the power-loss test, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


def make_ext4(image: Path, size: int) -> None:
    with open(image, "wb") as f:
        f.truncate(size)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0", "-E",
       "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(image))  # fmt: skip


class RecordedDisk:
    """An ext4 on a loop device over the recorder's FUSE file; see the module note."""

    def __init__(self, workdir: Path, size: int) -> None:
        self.workdir = workdir
        self.size = size
        self.base = workdir / "base.img"
        self.fuse_dir = workdir / "fuse"
        self.mountpoint = workdir / "mnt"
        self.log = workdir / "log"
        self.before_unmount: list[Callable[[], object]] = []
        self.recorder: subprocess.Popen[bytes] | None = None
        self.device: str | None = None

    def events(self) -> int:
        """How many records the log holds now."""
        return int((self.fuse_dir / "events").read_bytes())

    def __enter__(self) -> RecordedDisk:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        make_ext4(self.base, self.size)
        work = self.workdir / "work.img"
        sh("cp", "--sparse=always", str(self.base), str(work))
        self.fuse_dir.mkdir()
        self.mountpoint.mkdir(exist_ok=True)
        argv = [sys.executable, str(RECORDER), str(work), str(self.fuse_dir), str(self.log)]
        self.recorder = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self._wait_ready(self.recorder)
        disk = str(self.fuse_dir / "disk")
        self.device = sh("losetup", "--find", "--show", "--direct-io=on", disk).strip()
        sh("mount", self.device, str(self.mountpoint))

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise RuntimeError(f"the recorder did not start (exit {proc.poll()}): {line!r}")

    def close(self) -> None:
        """Tear everything down, in order; every step is tried."""
        for callback in self.before_unmount:
            with contextlib.suppress(Exception):
                callback()
        if _is_mounted(self.mountpoint):
            _umount(self.mountpoint)
        if self.device is not None:
            subprocess.run(["losetup", "--detach", self.device], capture_output=True, check=False)
            self.device = None
        if self.recorder is not None:
            self._stop_recorder(self.recorder)
            self.recorder = None

    def _stop_recorder(self, proc: subprocess.Popen[bytes]) -> None:
        if _is_mounted(self.fuse_dir):
            _umount(self.fuse_dir)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            code = proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        if code != 0:
            raise RuntimeError(f"the recorder exited {code}: its log may be incomplete")


def _is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(mountpoint == target for _, mountpoint, _ in mounts())


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def mounted_image(image: Path, mountpoint: Path) -> Iterator[Path]:
    """`image` loop-attached and mounted at `mountpoint`; unmounted and detached after."""
    device = sh("losetup", "--find", "--show", str(image)).strip()
    try:
        sh("mount", device, str(mountpoint))
        try:
            yield mountpoint
        finally:
            _umount(mountpoint)
    finally:
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)
