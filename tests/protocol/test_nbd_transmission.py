"""Transmission through python3-libnbd: reads, writes, FUA, flush, errors, concurrency."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

import nbd
import pytest

from shadowblk.provider.errors import DamagedData, InsufficientStorage

Connect = Callable[..., Any]
Reference = Callable[[str, int, int], bytes]

KiB = 1024
MiB = 1024 * KiB


def errnum(excinfo: pytest.ExceptionInfo[nbd.Error]) -> int:
    return int(excinfo.value.errnum)


def wait_all(h: nbd.NBD, cookies: list[int]) -> None:
    """Poll until every command completed; each must have succeeded."""
    pending = set(cookies)
    while pending:
        pending -= {c for c in pending if h.aio_command_completed(c)}
        if pending:
            h.poll(-1)


def test_write_then_read_through_another_connection(connect: Connect, reference: Reference) -> None:
    data = bytes(range(256)) * 300  # unaligned length, at an unaligned offset
    connect("vol").pwrite(data, 12345)
    assert reference("vol", 12345, len(data)) == data
    assert connect("vol").pread(len(data) + 2, 12344)[1:-1] == data


def test_large_requests_round_trip(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    data = bytes([7, 1, 9]) * (4 * MiB // 3)
    h.pwrite(data, MiB)
    assert reference("vol", MiB, len(data)) == data
    assert h.pread(len(data), MiB) == data


def test_largest_request_is_32_mib(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    assert h.pread(16 * MiB, 0) == reference("vol", 0, 16 * MiB)
    with pytest.raises(nbd.Error) as info:
        h.pread(32 * MiB + 1, 0)
    assert errnum(info) == errno.EINVAL
    assert h.pread(1, 0) == reference("vol", 0, 1)


def test_snapshot_export_is_unchanged_by_writes_to_the_volume(
    connect: Connect, reference: Reference
) -> None:
    before = reference("vol@1", 0, 64 * KiB)
    connect("vol").pwrite(b"\x55" * 64 * KiB, 0)
    assert connect("vol@1").pread(64 * KiB, 0) == before
    assert reference("vol", 0, 64 * KiB) == b"\x55" * 64 * KiB


def test_write_to_read_only_export_is_eperm_and_payload_consumed(
    connect: Connect, reference: Reference
) -> None:
    h = connect("vol@1")
    before = reference("vol@1", 0, 8 * KiB)
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"\xff" * 8 * KiB, 0)
    assert errnum(info) == errno.EPERM
    assert h.pread(8 * KiB, 0) == before  # the connection is still in step
    assert reference("vol@1", 0, 8 * KiB) == before


def test_read_past_end_is_einval(connect: Connect) -> None:
    h = connect("vol")
    size = h.get_size()
    for offset, length in [(size, 512), (size - 512, 1024), (2**63, 512)]:
        with pytest.raises(nbd.Error) as info:
            h.pread(length, offset)
        assert errnum(info) == errno.EINVAL
    assert len(h.pread(512, size - 512)) == 512


def test_write_past_end_is_enospc(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    size = h.get_size()
    before = reference("vol", size - 512, 512)
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"\x01" * 1024, size - 512)
    assert errnum(info) == errno.ENOSPC
    assert reference("vol", size - 512, 512) == before
    h.pwrite(b"\x02" * 512, size - 512)
    assert reference("vol", size - 512, 512) == b"\x02" * 512


def test_zero_length_requests_are_answered(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    assert h.pread(0, 4096) == b""
    h.pwrite(b"", 4096)
    assert h.pread(16, 4096) == reference("vol", 4096, 16)


def test_fua_write_is_durable_when_acknowledged(connect: Connect, fake: Any) -> None:
    h = connect("vol")
    h.pwrite(b"\x11" * 4096, 0)
    assert fake.durable_pread("vol", 0, 4096) != b"\x11" * 4096
    h.pwrite(b"\x22" * 4096, 8192, nbd.CMD_FLAG_FUA)
    assert fake.durable_pread("vol", 8192, 4096) == b"\x22" * 4096


def test_flush_makes_earlier_writes_durable(connect: Connect, fake: Any) -> None:
    h = connect("vol")
    h.pwrite(b"\x33" * 4096, 0)
    assert fake.durable_pread("vol", 0, 4096) != b"\x33" * 4096
    h.flush()
    assert fake.durable_pread("vol", 0, 4096) == b"\x33" * 4096


def test_writes_the_engine_cannot_take_at_once_go_to_a_thread(
    connect: Connect, fake: Any, reference: Reference
) -> None:
    fake.stores["vol"].hold_writes = True
    h = connect("vol")
    h.pwrite(b"\x44" * 4096, 0)
    h.pwrite(b"\x45" * 4096, 4096, nbd.CMD_FLAG_FUA)
    assert fake.stores["vol"].blocking_writes == 2
    assert reference("vol", 0, 8192) == b"\x44" * 4096 + b"\x45" * 4096
    assert fake.durable_pread("vol", 4096, 4096) == b"\x45" * 4096


@pytest.mark.parametrize(
    ("op", "exc", "expected"),
    [
        ("read", DamagedData("chunk 3 fails its checksum"), errno.EIO),
        ("write", InsufficientStorage("diff area full"), errno.ENOSPC),
        ("flush", OSError(errno.EDQUOT, "quota"), errno.ENOSPC),
        ("read", RuntimeError("a bug"), errno.EIO),
        ("write", KeyError("a bug"), errno.EIO),
        ("flush", ZeroDivisionError(), errno.EIO),
    ],
)
def test_engine_errors_become_that_requests_error(
    connect: Connect, fake: Any, reference: Reference, op: str, exc: BaseException, expected: int
) -> None:
    h = connect("vol")
    fake.stores["vol"].faults[op] = exc
    call = {"read": lambda: h.pread(512, 0), "write": lambda: h.pwrite(b"x" * 512, 0)}
    with pytest.raises(nbd.Error) as info:
        call.get(op, h.flush)()
    assert errnum(info) == expected
    del fake.stores["vol"].faults[op]
    assert h.pread(512, 1024) == reference("vol", 1024, 512)  # the connection goes on


def test_replies_come_out_of_order_while_a_flush_blocks(
    connect: Connect, fake: Any, reference: Reference
) -> None:
    gate = fake.stores["vol"].flush_gate = threading.Event()
    h = connect("vol")
    flush = h.aio_flush()
    write = h.aio_pwrite(b"\x66" * 4096, 0)
    assert h.pread(4096, 0) == b"\x66" * 4096  # served while the flush still waits
    assert not h.aio_command_completed(flush)
    gate.set()
    wait_all(h, [flush, write])
    assert fake.stores["vol"].flushes == 1
    assert reference("vol", 0, 4096) == b"\x66" * 4096


def test_many_requests_in_flight(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 4096) for i in range(64)]
    cookies.append(h.aio_flush())
    wait_all(h, cookies)
    assert reference("vol", 0, 64 * 4096) == b"".join(bytes([i]) * 4096 for i in range(64))


def test_many_reads_in_flight_all_come_back(connect: Connect, reference: Reference) -> None:
    # more reply bytes than one batch holds (wire.BATCH_LIMIT): the queue goes out in parts
    h = connect("vol")
    h.pwrite(bytes(range(256)) * 16 * 400, 0)
    buffers = [nbd.Buffer(4096) for _ in range(400)]
    cookies = [h.aio_pread(buf, i * 4096) for i, buf in enumerate(buffers)]
    wait_all(h, cookies)
    expected = reference("vol", 0, 400 * 4096)
    assert b"".join(buf.to_bytearray() for buf in buffers) == expected


def test_one_export_open_per_connection(connect: Connect, fake: Any, server: Any) -> None:
    h = connect("vol@1")
    h.pread(512, 0)
    assert [d.name for d in fake.open_devices] == ["vol@1"]
    stats = server.statistics()
    assert stats["connections_open"] == 1
    assert stats["requests_served"] == 1
