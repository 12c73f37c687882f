"""TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE, structured reads (holes, DF), FUA on every
command and multi-conn, through python3-libnbd."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import nbd
import pytest

from shadowblk.provider.api import EXTENT_ZERO, ExportRegistry

Connect = Callable[..., Any]
Reference = Callable[[str, int, int], bytes]

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB


def errnum(excinfo: pytest.ExceptionInfo[nbd.Error]) -> int:
    return int(excinfo.value.errnum)


def read_chunks(h: Any, count: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    """(offset, length, status) of each chunk of a structured read, as libnbd saw them."""
    seen: list[tuple[int, int, int]] = []

    def chunk(subbuf: bytes, chunk_offset: int, status: int, error: Any) -> int:
        seen.append((chunk_offset, len(subbuf), status))
        return 0

    h.pread_structured(count, offset, chunk, flags)
    return seen


def assert_tiles(chunks: list[tuple[int, int, int]], offset: int, count: int) -> None:
    """The chunks cover [offset, offset+count) exactly, without overlap."""
    spans = sorted((start, start + length) for start, length, _ in chunks)
    assert spans[0][0] == offset and spans[-1][1] == offset + count
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


# TRIM and WRITE_ZEROES


@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA])
def test_write_zeroes_reads_back_as_zeroes(
    connect: Connect, reference: Reference, flags: int
) -> None:
    h = connect("vol")
    before = reference("vol", 0, 4 * CHUNK)
    h.zero(2 * CHUNK + 100, CHUNK - 50, flags)  # unaligned at both ends
    after = reference("vol", 0, 4 * CHUNK)
    assert after[CHUNK - 50 : 3 * CHUNK + 50] == b"\0" * (2 * CHUNK + 100)
    assert after[: CHUNK - 50] == before[: CHUNK - 50]
    assert after[3 * CHUNK + 50 :] == before[3 * CHUNK + 50 :]
    assert h.pread(2 * CHUNK + 100, CHUNK - 50) == bytes(2 * CHUNK + 100)


def test_trim_reads_back_as_zeroes_and_leaves_the_snapshot(
    connect: Connect, reference: Reference
) -> None:
    h = connect("vol")
    snapshot = reference("vol@1", 4 * MiB, MiB)
    h.trim(MiB, 4 * MiB)
    assert reference("vol", 4 * MiB, MiB) == bytes(MiB)  # shadowblk's TRIM zeroes
    assert reference("vol@1", 4 * MiB, MiB) == snapshot


def test_no_hole_asks_the_engine_not_to_punch(connect: Connect, fake: Any) -> None:
    h = connect("vol")
    h.zero(CHUNK, 0, nbd.CMD_FLAG_NO_HOLE)
    h.zero(CHUNK, CHUNK)
    h.trim(CHUNK, 2 * CHUNK)
    assert fake.stores["vol"].inline_zeroes == [(0, CHUNK, False), (CHUNK, CHUNK, True),
                                                (2 * CHUNK, CHUNK, True)]  # fmt: skip


def test_fast_zero_fails_fast_when_the_engine_must_preserve(
    connect: Connect, fake: Any, reference: Reference
) -> None:
    store = fake.stores["vol"]
    store.hold_zeroes = True  # zero_nowait says no: zero() must be called
    store.fast_zero_unsupported = True  # the chunks need a preserve
    before = reference("vol", 0, CHUNK)
    h = connect("vol")
    with pytest.raises(nbd.Error) as info:
        h.zero(CHUNK, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert errnum(info) == errno.ENOTSUP
    assert reference("vol", 0, CHUNK) == before
    h.zero(CHUNK, 0)  # without the flag the same request succeeds, the slow way
    assert store.blocking_zeroes == [(0, CHUNK, True, False)]
    assert reference("vol", 0, CHUNK) == bytes(CHUNK)


def test_fast_zero_that_the_engine_can_do(connect: Connect, fake: Any) -> None:
    h = connect("vol")
    h.zero(CHUNK, 0, nbd.CMD_FLAG_FAST_ZERO)  # never inline: only zero(fast=True) may refuse
    h.zero(CHUNK, CHUNK, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    h.zero(CHUNK, 2 * CHUNK)  # without the flag: inline
    assert fake.stores["vol"].inline_zeroes == [(2 * CHUNK, CHUNK, True)]
    assert fake.stores["vol"].blocking_zeroes == [(0, CHUNK, True, True),
                                                  (CHUNK, CHUNK, False, True)]  # fmt: skip


def test_fast_zero_on_the_engine_either_zeroes_or_says_enotsup(
    connect: Connect, reference: Reference
) -> None:
    h = connect("vol")
    before = reference("vol", MiB, MiB)
    try:
        h.zero(MiB, MiB, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as exc:
        assert exc.errnum == errno.ENOTSUP
        assert reference("vol", MiB, MiB) == before  # SHOULD NOT alter the export
    else:
        assert reference("vol", MiB, MiB) == bytes(MiB)


@pytest.mark.parametrize("op", ["trim", "zero"])
def test_trim_and_zero_on_a_snapshot_are_eperm(
    connect: Connect, reference: Reference, op: str
) -> None:
    h = connect("vol@1")
    before = reference("vol@1", 0, CHUNK)
    with pytest.raises(nbd.Error) as info:
        getattr(h, op)(CHUNK, 0)
    assert errnum(info) == errno.EPERM
    assert reference("vol@1", 0, CHUNK) == before
    assert h.pread(16, 0) == before[:16]


def test_trim_and_zero_past_the_end(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    size = h.get_size()
    before = reference("vol", size - CHUNK, CHUNK)
    with pytest.raises(nbd.Error) as info:
        h.zero(2 * CHUNK, size - CHUNK)
    assert errnum(info) == errno.ENOSPC  # the spec: a write past the end
    with pytest.raises(nbd.Error) as info:
        h.trim(2 * CHUNK, size - CHUNK)
    assert errnum(info) == errno.EINVAL  # the spec: a trim past the end
    assert reference("vol", size - CHUNK, CHUNK) == before


def test_zero_length_trim_zero_and_cache_are_answered(
    connect: Connect, reference: Reference
) -> None:
    h = connect("vol")
    before = reference("vol", 0, 512)
    h.trim(0, 0)
    h.zero(0, 0)
    h.zero(0, 0, nbd.CMD_FLAG_FAST_ZERO)
    h.cache(0, 0)
    assert reference("vol", 0, 512) == before
    assert h.pread(512, 0) == before


@pytest.mark.parametrize("op", ["trim", "zero", "pwrite"])
def test_fua_makes_that_command_durable(connect: Connect, fake: Any, op: str) -> None:
    h = connect("vol")
    args = (b"\x5a" * CHUNK,) if op == "pwrite" else (CHUNK,)
    getattr(h, op)(*args, 3 * CHUNK, nbd.CMD_FLAG_FUA)
    expected = b"\x5a" * CHUNK if op == "pwrite" else bytes(CHUNK)
    assert fake.durable_pread("vol", 3 * CHUNK, CHUNK) == expected
    assert fake.stores["vol"].flushes == 1


def test_fua_is_accepted_on_every_command(connect: Connect, reference: Reference) -> None:
    fua = nbd.CMD_FLAG_FUA
    for export in ("vol", "vol@1"):
        h = connect(export, contexts=("base:allocation",))
        assert h.pread(512, 0, fua) == reference(export, 0, 512)
        h.cache(512, 0, fua)
        h.flush(fua)
        seen: list[str] = []
        h.block_status(512, 0, lambda ctx, *_, seen=seen: seen.append(ctx) or 0, fua)
        assert seen == ["base:allocation"]


# CACHE


def test_cache_is_passed_to_the_engine(connect: Connect, fake: Any) -> None:
    connect("vol").cache(MiB, 2 * MiB)
    connect("vol@1").cache(4096, 0)
    assert fake.stores["vol"].cached == [(2 * MiB, MiB)]
    assert fake.stores["vol@1"].cached == [(0, 4096)]


def test_cache_on_both_exports_and_past_the_end(connect: Connect, reference: Reference) -> None:
    for export in ("vol", "vol@1"):
        h = connect(export)
        h.cache(4 * MiB, 0)
        with pytest.raises(nbd.Error) as info:
            h.cache(2 * CHUNK, h.get_size() - CHUNK)
        assert errnum(info) == errno.EINVAL
        assert h.pread(64, 0) == reference(export, 0, 64)


# Structured reads


def zero_runs(registry: ExportRegistry, export: str, offset: int, count: int) -> list[tuple]:
    """(start, length) of the runs `extents` flags ZERO, neighbours merged."""
    device = registry.open_export(export)
    try:
        runs = device.extents(offset, count)
    finally:
        device.close()
    found: list[tuple[int, int]] = []
    for length, flags in runs:
        if flags & EXTENT_ZERO and found and sum(found[-1]) == offset:
            found[-1] = (found[-1][0], found[-1][1] + length)
        elif flags & EXTENT_ZERO:
            found.append((offset, length))
        offset += length
    return found


def test_structured_read_sends_holes_where_extents_say_zero(
    connect: Connect, registry: ExportRegistry, reference: Reference
) -> None:
    h = connect("vol")
    h.zero(4 * CHUNK, 2 * CHUNK)
    h.pwrite(b"\x11" * 100, 3 * CHUNK + 7)  # a data island inside the zeroes
    # until their preserves are applied, chunks read as data whatever they hold (pending:
    # extents.origin_allocation), so the extents asked for below could differ from the
    # ones the read saw; FLUSH waits for the preserves
    h.flush()
    offset, count = CHUNK + 512, 6 * CHUNK
    chunks = read_chunks(h, count, offset)
    assert_tiles(chunks, offset, count)
    holes = [(start, length) for start, length, status in chunks if status == nbd.READ_HOLE]
    assert holes == zero_runs(registry, "vol", offset, count)
    for start, length in holes:
        assert reference("vol", start, length) == bytes(length)
    assert h.pread(count, offset) == reference("vol", offset, count)


def test_structured_read_of_zeroed_chunks_has_holes(connect: Connect, fake: Any) -> None:
    h = connect("vol")
    h.zero(4 * CHUNK, 2 * CHUNK)
    h.pwrite(b"\x11" * 100, 3 * CHUNK + 7)
    chunks = read_chunks(h, 6 * CHUNK, CHUNK + 512)
    assert [(start, length) for start, length, status in chunks if status == nbd.READ_HOLE] == [
        (2 * CHUNK, CHUNK), (4 * CHUNK, 2 * CHUNK),
    ]  # fmt: skip
    small = read_chunks(h, CHUNK - 1, 2 * CHUNK)  # shorter than HOLE_SCAN_MIN: no look-up
    assert small == [(2 * CHUNK, CHUNK - 1, nbd.READ_DATA)]


def test_df_read_is_one_data_chunk(connect: Connect, reference: Reference) -> None:
    h = connect("vol")
    h.zero(4 * CHUNK, 0)
    chunks = read_chunks(h, 8 * CHUNK, 0, nbd.CMD_FLAG_DF)
    assert chunks == [(0, 8 * CHUNK, nbd.READ_DATA)]
    assert h.pread(8 * CHUNK, 0, nbd.CMD_FLAG_DF) == reference("vol", 0, 8 * CHUNK)


def test_large_structured_reads_are_correct(connect: Connect, reference: Reference) -> None:
    h = connect("vol@1")
    for offset, count in [(0, 16 * MiB), (12345, 5 * MiB + 3), (16 * MiB - 1, 1)]:
        chunks = read_chunks(h, count, offset)
        assert_tiles(chunks, offset, count)
        assert h.pread(count, offset) == reference("vol@1", offset, count)


def test_structured_read_errors_are_error_chunks(connect: Connect, fake: Any) -> None:
    from shadowblk.provider.errors import DamagedData

    h = connect("vol")
    fake.stores["vol"].faults["read"] = DamagedData("chunk 9 fails its checksum")
    with pytest.raises(nbd.Error) as info:
        h.pread(CHUNK, 0)
    assert errnum(info) == errno.EIO
    del fake.stores["vol"].faults["read"]
    with pytest.raises(nbd.Error) as info:
        h.pread(512, h.get_size())
    assert errnum(info) == errno.EINVAL


def test_extents_failure_falls_back_to_a_data_read(
    connect: Connect, fake: Any, reference: Reference, caplog: pytest.LogCaptureFixture
) -> None:
    fake.stores["vol"].faults["extents"] = RuntimeError("an engine bug")
    h = connect("vol")
    assert read_chunks(h, 4 * CHUNK, 0) == [(0, 4 * CHUNK, nbd.READ_DATA)]
    assert h.pread(4 * CHUNK, 0) == reference("vol", 0, 4 * CHUNK)
    assert any("an engine bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


# Multi-conn


def test_a_flush_on_one_connection_covers_writes_of_another(
    connect: Connect, fake: Any, reference: Reference
) -> None:
    writer, flusher = connect("vol"), connect("vol")
    assert writer.can_multi_conn() and flusher.can_multi_conn()
    writer.pwrite(b"\x77" * 4096, 0)
    writer.zero(CHUNK, CHUNK)
    assert flusher.pread(4096, 0) == b"\x77" * 4096  # visible at once on the other
    assert fake.durable_pread("vol", 0, 4096) != b"\x77" * 4096
    flusher.flush()
    assert fake.durable_pread("vol", 0, 4096) == b"\x77" * 4096
    assert fake.durable_pread("vol", CHUNK, CHUNK) == bytes(CHUNK)


def test_writes_on_many_connections_meet(connect: Connect, reference: Reference) -> None:
    handles = [connect("vol") for _ in range(4)]
    for index, h in enumerate(handles):
        h.pwrite(bytes([index + 1]) * CHUNK, index * CHUNK)
    handles[0].flush()
    expected = b"".join(bytes([i + 1]) * CHUNK for i in range(4))
    for h in handles:
        assert h.pread(4 * CHUNK, 0) == expected
    assert reference("vol", 0, 4 * CHUNK) == expected
