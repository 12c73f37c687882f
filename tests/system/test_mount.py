"""Real filesystems on a volume through its FUSE file, snapshots of them mounted with
`shadowblk mount`: ext4, xfs and btrfs, crash-consistent snapshots taken while writing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from exports import export_sha256

from shadowblk.mount import host

SIZE = "512M"  # xfs wants 300 MiB at least
MKFS = {"ext4": ["mkfs.ext4", "-q"], "xfs": ["mkfs.xfs", "-q"], "btrfs": ["mkfs.btrfs", "-q"]}
FSCK = {
    "ext4": ["e2fsck", "-fn"],
    "xfs": ["xfs_repair", "-n"],
    "btrfs": ["btrfs", "check", "--readonly"],
}


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Origin:
    """A filesystem made on volume `v` through `<state>/fuse/v` and a loop device."""

    device: str
    mountpoint: Path

    def unmount(self) -> None:
        sh("umount", str(self.mountpoint))
        sh("losetup", "--detach", self.device)


@pytest.fixture
def origin_fs(service: Any, short_tmp: Path, request: Any) -> Iterator[tuple[Origin, str]]:
    fstype = request.param
    service.cli.run("volume", "create", "v", "--size", SIZE, "--sparse")
    device = sh("losetup", "--find", "--show", str(service.state_dir / "fuse" / "v")).strip()
    sh(*MKFS[fstype], device)
    mountpoint = short_tmp / "origin"
    mountpoint.mkdir()
    sh("mount", device, str(mountpoint))
    origin = Origin(device, mountpoint)
    try:
        yield origin, fstype
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
        subprocess.run(["losetup", "--detach", device], capture_output=True, check=False)


class Writer(threading.Thread):
    """Writes files into the origin filesystem until stopped, fsyncing every other one:
    the load a snapshot is taken under (no freeze)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                with open(self.directory / f"load-{n}", "wb") as f:
                    f.write(os.urandom(256 * 1024))
                    if n % 2:
                        os.fsync(f.fileno())
                n += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def write_fsynced(directory: Path, count: int, prefix: str = "kept") -> dict[str, str]:
    digests = {}
    for i in range(count):
        data = os.urandom(512 * 1024 + i)
        path = directory / f"{prefix}-{i}"
        with open(path, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        digests[path.name] = hashlib.sha256(data).hexdigest()
    os.sync()  # and their directory entries (fsync of a file does not promise its name)
    return digests


def mounted_loop(service: Any, mountpoint: Path) -> host.Loop:
    loops = [lp for lp in host.loops_under(service.state_dir / "fuse")
             if str(mountpoint) in lp.mountpoints]  # fmt: skip
    assert len(loops) == 1, loops
    return loops[0]


@pytest.mark.parametrize("origin_fs", ["ext4", "xfs", "btrfs"], indirect=True)
def test_snapshot_of_a_busy_filesystem_mounts_recovered(
    service: Any, short_tmp: Path, origin_fs: tuple[Origin, str]
) -> None:
    origin, fstype = origin_fs
    kept = write_fsynced(origin.mountpoint, 8)
    writer = Writer(origin.mountpoint)
    writer.start()
    try:
        threading.Event().wait(0.5)
        service.cli.run("create", "v")  # crash-consistent: the filesystem is not frozen
        more = write_fsynced(origin.mountpoint, 2, "after")  # keep writing after it
    finally:
        writer.stop.set()
        writer.join()
    assert writer.error is None, writer.error
    snapshot_sum = export_sha256(service, "v@1")

    # 1. mount through a recovery overlay: every file fsynced before the snapshot is there
    target = short_tmp / "snap"
    target.mkdir()
    out = service.cli.run("mount", "v@1", str(target)).stdout
    assert fstype in out
    for name, digest in kept.items():
        assert sha256(target / name) == digest, name
    assert not any((target / name).exists() for name in more)
    listed = {s["name"]: s for s in service.cli.json("list")}
    assert listed["v@1"]["mounted"] == [str(target)]
    for force in ([], ["--force"]):  # a mounted snapshot is never deleted under its user
        proc = service.cli.run("delete", "v@1", *force, expect=None)
        assert proc.returncode != 0 and "mounted on" in proc.stderr, proc.stderr

    # 2. the recovered view passes its checker: unmount only the filesystem, check the
    #    loop device (the overlay still holds the replayed journal), then let it go
    loop = mounted_loop(service, target)
    assert Path(loop.backing).name.startswith(".v@1.recover-")
    sh("umount", str(target))
    sh(*FSCK[fstype], loop.device)
    sh("losetup", "--detach", loop.device)

    # 3. shadowblk umount takes all of it down; the overlay goes with the loop device
    service.cli.run("mount", "v@1", str(target))
    service.cli.run("umount", str(target))
    assert [lp.backing for lp in host.loops_under(service.state_dir / "fuse")] == [
        str(service.state_dir / "fuse" / "v")  # only the origin's loop device is left
    ]
    assert sorted(os.listdir(service.state_dir / "fuse")) == ["v", "v@1"]
    assert service.cli.json("list")[0]["mounted"] == []

    # the snapshot's own bytes never changed
    assert export_sha256(service, "v@1") == snapshot_sum
    origin.unmount()


@pytest.mark.parametrize("origin_fs", ["ext4"], indirect=True)
def test_no_recover_mounts_the_snapshot_as_it_is(
    service: Any, short_tmp: Path, origin_fs: tuple[Origin, str]
) -> None:
    origin, _ = origin_fs
    kept = write_fsynced(origin.mountpoint, 4)
    origin.unmount()  # a clean filesystem: nothing for the journal to replay
    service.cli.run("create", "v")
    target = short_tmp / "snap"
    target.mkdir()
    service.cli.run("mount", "v@1", str(target), "--no-recover", "-o", "noatime")
    loop = mounted_loop(service, target)
    assert Path(loop.backing).name == "v@1"  # the snapshot itself, no overlay
    ro = Path("/sys/block") / Path(loop.device).name / "ro"
    assert ro.read_text().strip() == "1"
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    options = next(m for m in mounts if f" {target} " in m).split()[3]
    assert {"ro", "noatime"} <= set(options.split(","))
    for name, digest in kept.items():
        assert sha256(target / name) == digest
    service.cli.run("umount", str(target))


@pytest.mark.parametrize("origin_fs", ["ext4"], indirect=True)
def test_restart_after_sigkill_clears_stale_mounts(
    service: Any, service_factory: Any, short_tmp: Path, origin_fs: tuple[Origin, str]
) -> None:
    origin, _ = origin_fs
    kept = write_fsynced(origin.mountpoint, 2)
    service.cli.run("create", "v")
    target = short_tmp / "snap"
    target.mkdir()
    service.cli.run("mount", "v@1", str(target))
    service.kill()
    fuse = service.state_dir / "fuse"
    assert len(host.loops_under(fuse)) == 2  # the debris a crash leaves
    again = service_factory(service.state_dir)
    assert host.loops_under(fuse) == []
    assert not host.is_mountpoint(target) and not host.is_mountpoint(origin.mountpoint)
    assert sorted(os.listdir(fuse)) == ["v", "v@1"]
    again.cli.run("mount", "v@1", str(target))
    for name, digest in kept.items():
        assert sha256(target / name) == digest
    again.cli.run("umount", str(target))
