"""The FUSE files of a real service: names, sizes, modes, coherence with NBD, errors."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from exports import connect

from shadowblk.tools.client import ControlClient

MiB = 1 << 20


def test_files_follow_volumes_and_snapshots(service: Any) -> None:
    fuse = service.state_dir / "fuse"
    service.cli.run("volume", "create", "v", "--size", "8M", "--sparse")
    st = os.stat(fuse / "v")
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (8 * MiB, 0o644)
    service.cli.run("create", "v")
    st = os.stat(fuse / "v@1")
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (8 * MiB, 0o444)
    assert sorted(os.listdir(fuse)) == ["v", "v@1"]
    service.cli.run("delete", "v@1")
    assert sorted(os.listdir(fuse)) == ["v"]
    assert not (fuse / "v@1").exists()


def test_fuse_writes_are_copy_on_write_and_coherent_with_nbd(service: Any) -> None:
    fuse = service.state_dir / "fuse"
    service.cli.run("volume", "create", "v", "--size", "8M", "--sparse")
    before = os.urandom(8 * MiB)
    with open(fuse / "v", "r+b", buffering=0) as f:
        f.write(before)
        os.fsync(f.fileno())
    service.cli.run("create", "v")
    after = os.urandom(MiB)
    with open(fuse / "v", "r+b", buffering=0) as f:
        f.seek(3 * MiB + 512)
        f.write(after)
        os.fsync(f.fileno())
    # read back through the other front-end
    expected = before[: 3 * MiB + 512] + after + before[4 * MiB + 512 :]
    assert connect(service, "v").pread(8 * MiB, 0) == expected
    assert connect(service, "v@1").pread(8 * MiB, 0) == before
    assert (fuse / "v@1").read_bytes() == before
    # and an NBD write is seen at once through the origin file (direct_io: no stale cache)
    connect(service, "v").pwrite(b"\x5a" * 4096, 0)
    with open(fuse / "v", "rb", buffering=0) as f:
        assert f.read(4096) == b"\x5a" * 4096


def test_fsync_of_a_fuse_file_is_an_engine_flush(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "1M", "--sparse")

    def flushes() -> int:
        with ControlClient.connect(service.state_dir) as client:
            return int(client.call("stats")["engine"]["flushes"])

    before = flushes()
    with open(service.state_dir / "fuse" / "v", "r+b", buffering=0) as f:
        f.write(b"d" * 4096)
        assert flushes() == before  # a write alone does not flush
        os.fsync(f.fileno())
        assert flushes() == before + 1


def test_snapshot_files_refuse_writes_and_sizes_are_fixed(service: Any) -> None:
    fuse = service.state_dir / "fuse"
    service.cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    service.cli.run("create", "v")
    with pytest.raises(OSError) as info:
        os.open(fuse / "v@1", os.O_WRONLY)
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        os.truncate(fuse / "v", 2 * MiB)
    assert info.value.errno == errno.EPERM
    fd = os.open(fuse / "v", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"x" * 8192, MiB - 4096)
        assert info.value.errno == errno.ENOSPC
        assert os.pwrite(fd, b"y" * 4096, MiB - 4096) == 4096
    finally:
        os.close(fd)
    assert connect(service, "v").pread(4096, MiB - 4096) == b"y" * 4096
    assert service.cli.run("delete", "v@1").returncode == 0


def test_an_open_snapshot_file_pins_the_snapshot(service: Any) -> None:
    fuse = service.state_dir / "fuse"
    service.cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    service.cli.run("create", "v")
    with open(fuse / "v@1", "rb"):
        proc = service.cli.run("delete", "v@1", expect=None)
        assert proc.returncode != 0 and "busy" in proc.stderr, proc.stderr
    service.cli.run("delete", "v@1")


def test_no_fuse(service_factory: Any, short_tmp: Path) -> None:
    svc = service_factory(short_tmp / "nofuse", "--no-fuse")
    svc.cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    svc.cli.run("create", "v")
    assert not (svc.state_dir / "fuse").exists()
    proc = svc.cli.run("mount", "v@1", str(short_tmp), expect=None)
    assert proc.returncode != 0 and "not-supported" in proc.stderr, proc.stderr
