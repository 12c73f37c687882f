"""A failing origin: errors reach the NBD client that caused them, or the next FLUSH for a
write acknowledged earlier; the service goes on."""

from __future__ import annotations

import errno
from typing import Any

import nbd
import pytest
from exports import connect

from shadowblk.tools.client import ControlClient

MiB = 1 << 20


def arm(service: Any, spec: str) -> None:
    with ControlClient.connect(service.state_dir) as client:
        client.call("fault.arm", spec=spec)


def test_origin_read_and_write_errors_are_nbd_errors(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "4M")
    h = connect(service, "v")
    h.pwrite(b"a" * MiB, 0)
    arm(service, "origin.read=eio")
    with pytest.raises(nbd.Error) as info:
        h.pread(4096, 0)
    assert info.value.errnum == errno.EIO
    assert h.pread(4096, 0) == b"a" * 4096  # the next one works
    arm(service, "origin.pwrite=enospc")
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"b" * 4096, 0)
    assert info.value.errnum == errno.ENOSPC
    h.pwrite(b"c" * 4096, 0)
    h.flush()
    assert h.pread(4096, 0) == b"c" * 4096


@pytest.mark.parametrize("size", [4096, 65536])
def test_a_refused_write_back_is_reported_and_tried_again(
    service: Any, service_factory: Any, size: int
) -> None:
    # 64 KiB (a whole chunk) is too large for the journal: a FLUSH waits for its write-back.
    # 4 KiB is journaled: a FLUSH need not wait, and the failure is reported at the first
    # FLUSH after it. Either way the write stays in the overlay until a later try of its
    # write-back works, and nothing acknowledged is lost.
    service.cli.run("volume", "create", "v", "--size", "4M")
    h = connect(service, "v")
    h.pwrite(b"a" * (4 * MiB), 0)
    h.flush()
    service.cli.run("create", "v")
    arm(service, "origin.write=eio")
    h.pwrite(b"z" * size, MiB)  # acknowledged from the overlay; its write-back fails
    assert h.pread(size, MiB) == b"z" * size
    if size < 65536:
        service.wait_preserves_applied("v")  # failed, then written on the next try
    with pytest.raises(nbd.Error) as info:
        h.flush()
    assert info.value.errnum == errno.EIO
    service.wait_preserves_applied("v")
    h.flush()  # reported once
    assert h.pread(size, MiB) == b"z" * size, "an acknowledged write was lost"
    assert connect(service, "v@1").pread(MiB, MiB) == b"a" * MiB  # the snapshot is intact
    h.pwrite(b"y" * 4096, 2 * MiB)
    h.flush()
    assert h.pread(4096, 2 * MiB) == b"y" * 4096
    assert "could not be written back to the origin" in service.log()
    service.kill()  # whatever the journal still holds is replayed
    again = service_factory(service.state_dir)
    assert connect(again, "v").pread(size, MiB) == b"z" * size
