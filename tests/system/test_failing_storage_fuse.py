"""A failing origin under a FUSE client: the read(2), write(2) or fsync(2) on the service's
FUSE file `<state>/fuse/VOLUME` that hit the error gets its errno (mount/fusefs.py passes
the engine's errno through), the next call works, the service goes on.

The FUSE file of a volume is opened with direct_io, so each pread/pwrite here is one FUSE
request and reaches the engine (no page cache in between). The NBD side of the same
faults is tests/system/test_failing_storage.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import pytest
from exports import connect

from shadowblk.tools.client import ControlClient

MiB = 1 << 20
BLOCK = 4096


def arm(service: Any, spec: str) -> None:
    with ControlClient.connect(service.state_dir) as client:
        client.call("fault.arm", spec=spec)


@pytest.fixture
def fuse_fd(service: Any) -> Iterator[int]:
    """A read-write descriptor of volume v's FUSE file, v filled with b"a"."""
    service.cli.run("volume", "create", "v", "--size", "4M")
    fd = os.open(service.state_dir / "fuse" / "v", os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * (4 * MiB), 0)
        os.fsync(fd)
        yield fd
    finally:
        os.close(fd)


def expect_errno(code: int, call: Any, *args: Any) -> None:
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == code, f"{call.__name__}: {info.value}"


def test_an_origin_read_error_is_eio_on_the_fuse_file(service: Any, fuse_fd: int) -> None:
    arm(service, "origin.read=eio")
    expect_errno(errno.EIO, os.pread, fuse_fd, BLOCK, 0)
    assert os.pread(fuse_fd, BLOCK, 0) == b"a" * BLOCK  # the next one works
    assert service.cli.run("status").returncode == 0


@pytest.mark.parametrize("fault, code", [("eio", errno.EIO), ("enospc", errno.ENOSPC)])
def test_an_origin_write_error_is_that_errno_on_the_fuse_file(
    service: Any, fuse_fd: int, fault: str, code: int
) -> None:
    arm(service, f"origin.pwrite={fault}")
    expect_errno(code, os.pwrite, fuse_fd, b"b" * BLOCK, MiB)
    assert os.pread(fuse_fd, BLOCK, MiB) == b"a" * BLOCK  # the failed write left nothing
    assert os.pwrite(fuse_fd, b"c" * BLOCK, MiB) == BLOCK  # the next one works
    os.fsync(fuse_fd)
    assert os.pread(fuse_fd, BLOCK, MiB) == b"c" * BLOCK
    assert connect(service, "v").pread(BLOCK, MiB) == b"c" * BLOCK  # and NBD agrees
    assert service.cli.run("status").returncode == 0


@pytest.mark.parametrize("size", [BLOCK, 65536])
def test_a_refused_write_back_is_eio_at_the_next_fsync(
    service: Any, fuse_fd: int, size: int
) -> None:
    # as tests/system/test_failing_storage.py: a journaled write's is the next fsync after;
    # the write is kept and its write-back tried again
    service.cli.run("create", "v")
    arm(service, "origin.write=eio")
    os.pwrite(fuse_fd, b"z" * size, MiB)  # acknowledged from the overlay; write-back fails
    if size < 65536:
        service.wait_preserves_applied("v")
    expect_errno(errno.EIO, os.fsync, fuse_fd)
    service.wait_preserves_applied("v")
    os.fsync(fuse_fd)  # reported once
    assert os.pread(fuse_fd, size, MiB) == b"z" * size, "an acknowledged write was lost"
    assert (service.state_dir / "fuse" / "v@1").read_bytes() == b"a" * (4 * MiB)
    os.pwrite(fuse_fd, b"y" * BLOCK, 2 * MiB)
    os.fsync(fuse_fd)
    assert os.pread(fuse_fd, BLOCK, 2 * MiB) == b"y" * BLOCK
    assert service.cli.run("status").returncode == 0
