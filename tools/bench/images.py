"""Image files the servers share, and the XFS filesystem that holds the 64 TiB volumes.

- `fill`: a raw image fully written with non-zero data (a zero chunk would be preserved as
  a zero entry, copying nothing, and flatter shadowblk), then fsynced so no writeback of
  it runs while a server is measured.
- `qcow2_copy`, `qcow2_snapshot`: the qcow2 peer of copy-on-write, from the same raw image.
- `xfs_mount`: ext4 caps a file at 16 TiB, so 64 TiB sparse volumes live on XFS: a sparse
  image file, `mkfs.xfs`, an explicit loop device, a mount. Teardown, in this order, even
  on failure or Ctrl-C: unmount, detach the loop device, remove the image.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .core import GiB, MiB
from .runner import run_checked

XFS_IMAGE_SIZE = 256 * GiB  # sparse; a sparse file on XFS may be larger than the filesystem


def fill(path: Path, size: int, seed: int = 1) -> Path:
    """Write `size` bytes of non-zero pseudo-random data to `path` and fsync it."""
    block = bytearray(random.Random(seed).randbytes(MiB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, MiB):
            block[:8] = offset.to_bytes(8, "little")  # no two MiB alike
            length = min(MiB, size - offset)
            os.pwrite(fd, memoryview(block)[:length], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def qcow2_copy(raw: Path, qcow2: Path, cluster_size: int) -> Path:
    run_checked(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                 f"cluster_size={cluster_size}", os.fspath(raw), os.fspath(qcow2)])  # fmt: skip
    return qcow2


def qcow2_snapshot(qcow2: Path, name: str) -> None:
    """An internal snapshot (`qemu-img snapshot -c`); the image must not be served now."""
    run_checked(["qemu-img", "snapshot", "-c", name, os.fspath(qcow2)])


@contextmanager
def xfs_mount(where: Path) -> Iterator[Path]:
    """A fresh XFS filesystem mounted at `where/mnt`, gone again on exit."""
    image, mountpoint = where / "xfs.img", where / "mnt"
    with ExitStack() as stack:
        stack.callback(image.unlink, missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(XFS_IMAGE_SIZE)
        run_checked(["mkfs.xfs", "-q", "-f", os.fspath(image)])
        # direct I/O: the image's own page cache would cache every block twice and make
        # each flush of the filesystem an fsync of the whole image's dirty pages
        loop = ["losetup", "--direct-io=on", "--find", "--show", os.fspath(image)]
        device = run_checked(loop).strip()
        stack.callback(_quietly, ["losetup", "-d", device])
        mountpoint.mkdir(exist_ok=True)
        run_checked(["mount", "-t", "xfs", device, os.fspath(mountpoint)])
        stack.callback(_umount, mountpoint)
        yield mountpoint


def _umount(mountpoint: Path) -> None:
    try:
        run_checked(["umount", os.fspath(mountpoint)], timeout=120)
    except RuntimeError:
        _quietly(["umount", "--lazy", os.fspath(mountpoint)])


def _quietly(argv: list[str]) -> None:
    with contextlib.suppress(RuntimeError, OSError):
        run_checked(argv, timeout=120)
