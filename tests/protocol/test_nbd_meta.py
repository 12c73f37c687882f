"""Meta contexts (base:allocation, qemu:dirty-bitmap:VOLUME@N) and BLOCK_STATUS, through
python3-libnbd and raw sockets."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Any

import nbd
import pytest
from rawclient import (
    CHUNK_ERROR,
    CHUNK_STATUS,
    CMD_BLOCK_STATUS,
    CMD_READ,
    EINVAL,
    FLAG_REQ_ONE,
    OPT_GO,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_META_CONTEXT,
    info_data,
    meta_data,
)

from shadowblk.provider.api import EXTENT_ZERO, ExportRegistry

Connect = Callable[..., Any]
Reference = Callable[[str, int, int], bytes]
RawFactory = Callable[[], Any]

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
BASE = "base:allocation"
BITMAP = "qemu:dirty-bitmap:vol@1"


def bitmaps_of(registry: ExportRegistry, export: str) -> list[str]:
    device = registry.open_export(export)
    try:
        return [f"qemu:dirty-bitmap:{name}" for name in device.dirty_bitmaps()]
    finally:
        device.close()


def listed(h: Any) -> list[str]:
    names: list[str] = []
    count = h.opt_list_meta_context(lambda name: names.append(name) or 0)
    assert count == len(names)
    return names


def block_status(h: Any, count: int, offset: int, flags: int = 0) -> dict[str, list[tuple]]:
    """context -> [(length, flags), ...] of one BLOCK_STATUS."""
    seen: dict[str, list[tuple[int, int]]] = {}

    def extent(context: str, at: int, entries: list[int], error: Any) -> int:
        assert at == offset and context not in seen
        seen[context] = list(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, extent, flags)
    return seen


def differing_chunks(reference: Reference, offset: int, count: int) -> set[int]:
    """Chunks whose contents differ between vol and vol@1."""
    first, last = offset // CHUNK, (offset + count - 1) // CHUNK
    start, size = first * CHUNK, (last + 1 - first) * CHUNK
    a, b = reference("vol", start, size), reference("vol@1", start, size)
    return {first + i for i in range(last + 1 - first) if a[i * CHUNK : (i + 1) * CHUNK]
            != b[i * CHUNK : (i + 1) * CHUNK]}  # fmt: skip


def chunks_flagged(extents: list[tuple[int, int]], offset: int, flag: int) -> set[int]:
    flagged = set()
    for length, flags in extents:
        if flags & flag:
            flagged |= set(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
        offset += length
    return flagged


# Listing and selecting.


@pytest.mark.parametrize("export", ["vol", "vol@1"])
def test_list_without_queries_names_every_context(
    connect: Connect, registry: ExportRegistry, export: str
) -> None:
    h = connect(export, opt_mode=True)
    bitmaps = bitmaps_of(registry, export)
    assert BITMAP in bitmaps_of(registry, "vol")
    assert listed(h) == [BASE, *bitmaps]
    h.opt_abort()


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        (["base:"], "base"),
        (["qemu:"], "bitmaps"),
        (["qemu:dirty-bitmap:"], "bitmaps"),
        ([BASE, BASE], "base"),
        (["base:nope", "qemu:dirty-bitmap:vol@99", "x-other:thing"], "none"),
        ([BITMAP, "base:"], "all-reversed"),
    ],
)
def test_list_with_queries(
    connect: Connect, registry: ExportRegistry, queries: list[str], expected: str
) -> None:
    bitmaps = bitmaps_of(registry, "vol")
    want = {"base": [BASE], "bitmaps": bitmaps, "none": [], "all-reversed": [BITMAP, BASE]}
    h = connect("vol", opt_mode=True, contexts=tuple(queries))
    assert listed(h) == want[expected]
    h.opt_abort()


def test_go_selects_the_contexts_asked_for(connect: Connect) -> None:
    h = connect("vol", contexts=(BASE, BITMAP, "qemu:dirty-bitmap:vol@99", "x-y:z"))
    assert h.can_meta_context(BASE) and h.can_meta_context(BITMAP)
    assert not h.can_meta_context("qemu:dirty-bitmap:vol@99")
    assert not h.can_meta_context("x-y:z")
    assert set(block_status(h, CHUNK, 0)) == {BASE, BITMAP}


def test_raw_listing_ids_are_zero_and_selection_ids_are_stable(raw: RawFactory) -> None:
    client = raw()
    client.start()
    client.send_option(OPT_STRUCTURED_REPLY)
    assert client.option_reply()[1] == REP_ACK
    replies = client.option_replies(OPT_LIST_META_CONTEXT, meta_data("vol", BASE))
    assert replies == [(REP_META_CONTEXT, b"\0\0\0\0" + BASE.encode()), (REP_ACK, b"")]
    first = client.set_meta("vol", BASE, BITMAP)
    assert set(first) == {BASE, BITMAP} and 0 not in first.values()
    assert len(set(first.values())) == 2
    assert client.set_meta("vol", BITMAP) == {BITMAP: first[BITMAP]}
    assert client.set_meta("vol", BASE, BITMAP) == first
    assert client.set_meta("vol") == {}  # no query selects nothing
    assert client.set_meta("vol", "base:", "qemu:", "qemu:dirty-bitmap:") == {}


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (meta_data("nope", BASE), REP_ERR_UNKNOWN),
        (meta_data("vol", "allocation"), REP_ERR_INVALID),  # no namespace
        (meta_data("vol", ":allocation"), REP_ERR_INVALID),
        (meta_data("vol", BASE)[:-1], REP_ERR_INVALID),  # query overruns the option
        (meta_data("vol", BASE) + b"x", REP_ERR_INVALID),  # trailing bytes
        (struct.pack(">II", 3, 0), REP_ERR_INVALID),  # name overruns
        (meta_data("vol") + struct.pack(">I", 1), REP_ERR_INVALID),  # count too large
        (b"", REP_ERR_INVALID),
    ],
)
@pytest.mark.parametrize("option", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_bad_meta_context_options_are_refused(
    raw: RawFactory, data: bytes, reply: int, option: int
) -> None:
    client = raw()
    client.start()
    assert client.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    if option == OPT_SET_META_CONTEXT:
        assert client.set_meta("vol", BASE)  # a failed SET drops this selection too
    assert [r for r, _ in client.option_replies(option, data)] == [reply]
    assert client.option_replies(OPT_GO, info_data("vol"))[-1][0] == REP_ACK
    client.request(CMD_BLOCK_STATUS, 0, 512, handle=3)
    (chunk,) = client.chunks()
    assert chunk.type == CHUNK_ERROR and chunk.error[0] == EINVAL


def test_set_before_structured_replies_is_invalid(raw: RawFactory) -> None:
    client = raw()
    client.start()
    assert [r for r, _ in client.option_replies(OPT_SET_META_CONTEXT, meta_data("vol", BASE))] == [
        REP_ERR_INVALID
    ]
    replies = client.option_replies(OPT_LIST_META_CONTEXT, meta_data("vol", BASE))
    assert [r for r, _ in replies] == [REP_META_CONTEXT, REP_ACK]  # listing is allowed


def test_contexts_set_for_another_export_lapse_at_go(raw: RawFactory) -> None:
    client = raw()
    client.go("vol@1", structured=True, contexts=())
    client.close()
    client = raw()
    client.start()
    assert client.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
    assert client.set_meta("vol", BASE)
    assert client.option_replies(OPT_GO, info_data("vol@1"))[-1][0] == REP_ACK
    client.request(CMD_BLOCK_STATUS, 0, 512, handle=5)
    (chunk,) = client.chunks()
    assert (chunk.handle, chunk.type, chunk.error[0]) == (5, CHUNK_ERROR, EINVAL)
    assert "meta context" in chunk.error[1]


# BLOCK_STATUS


@pytest.mark.parametrize("export", ["vol", "vol@1"])
def test_base_allocation_covers_the_range_and_zero_means_zero(
    connect: Connect, reference: Reference, export: str
) -> None:
    if export == "vol":
        connect("vol").zero(3 * CHUNK, 5 * CHUNK)
    h = connect(export, contexts=(BASE,))
    for offset, count in [(0, 16 * MiB), (5 * CHUNK + 3, 2 * CHUNK), (16 * MiB - 1, 1)]:
        extents = block_status(h, count, offset)[BASE]
        assert all(length > 0 for length, _ in extents)
        assert sum(length for length, _ in extents) <= count
        at = offset
        for length, flags in extents:
            if flags & EXTENT_ZERO:
                assert reference(export, at, length) == bytes(length)
            at += length


def test_base_allocation_reports_zeroed_and_punched_chunks(connect: Connect, fake: Any) -> None:
    h = connect("vol", contexts=(BASE,))
    h.zero(CHUNK, 2 * CHUNK, nbd.CMD_FLAG_NO_HOLE)
    h.trim(CHUNK, 4 * CHUNK)
    h.trim(CHUNK - 100, 6 * CHUNK + 50)  # unaligned: zeroed, but no whole chunk punched
    extents = block_status(h, 8 * CHUNK, 0)[BASE]
    assert extents == [(2 * CHUNK, 0), (CHUNK, 2), (CHUNK, 0), (CHUNK, 3), (3 * CHUNK, 0)]
    assert block_status(h, 4 * CHUNK, 2 * CHUNK, nbd.CMD_FLAG_REQ_ONE)[BASE] == [(CHUNK, 2)]
    assert block_status(h, 10, 4 * CHUNK + 5)[BASE] == [(10, 3)]
    assert fake.stores["vol"].holes == {4}


def test_dirty_bitmap_shows_the_chunks_that_differ(connect: Connect, reference: Reference) -> None:
    h = connect("vol", contexts=(BITMAP,))
    h.pwrite(b"\x99" * 10, 9 * CHUNK + 1)
    h.zero(2 * CHUNK, 11 * CHUNK)
    extents = block_status(h, 16 * MiB, 0)[BITMAP]
    assert sum(length for length, _ in extents) == 16 * MiB
    assert {flags for _, flags in extents} <= {0, 1}
    dirty = chunks_flagged(extents, 0, 1)
    assert {9, 11, 12} <= dirty
    assert dirty == differing_chunks(reference, 0, 16 * MiB)


def test_dirty_bitmap_on_the_snapshot_itself_is_clean(connect: Connect) -> None:
    h = connect("vol@1", contexts=(BITMAP,))
    assert h.can_meta_context(BITMAP)
    assert block_status(h, 16 * MiB, 0)[BITMAP] == [(16 * MiB, 0)]


def test_both_contexts_in_one_request_with_req_one(connect: Connect) -> None:
    h = connect("vol", contexts=(BASE, BITMAP))
    h.pwrite(b"\x01", 5 * CHUNK)
    status = block_status(h, 4 * CHUNK, 4 * CHUNK + 17, nbd.CMD_FLAG_REQ_ONE)
    assert set(status) == {BASE, BITMAP}
    for extents in status.values():
        assert len(extents) == 1 and 0 < extents[0][0] <= 4 * CHUNK


def test_block_status_errors(connect: Connect, raw: RawFactory) -> None:
    h = connect("vol", contexts=(BASE,))
    size = h.get_size()
    with pytest.raises(nbd.Error) as info:
        block_status(h, 2 * CHUNK, size - CHUNK)
    assert info.value.errnum == errno.EINVAL
    client = raw()
    client.go("vol", structured=True, contexts=(BASE,))
    client.request(CMD_BLOCK_STATUS, 0, 0, handle=1)  # an empty range cannot be described
    client.request(CMD_BLOCK_STATUS, 0, 512, flags=1 << 9, handle=2)  # an unknown flag
    client.request(CMD_BLOCK_STATUS, size, 1, handle=3)
    for _ in range(3):
        (chunk,) = client.chunks()
        assert chunk.type == CHUNK_ERROR and chunk.error[0] == EINVAL
    client.request(CMD_BLOCK_STATUS, size - 1, 1, flags=FLAG_REQ_ONE, handle=4)
    (chunk,) = client.chunks()
    assert chunk.type == CHUNK_STATUS and chunk.handle == 4 and len(chunk.payload) == 12


def test_block_status_needs_a_context(connect: Connect, raw: RawFactory) -> None:
    client = raw()
    client.go("vol", structured=True)
    client.request(CMD_BLOCK_STATUS, 0, 512, handle=8)
    (chunk,) = client.chunks()
    assert (chunk.handle, chunk.type, chunk.error[0]) == (8, CHUNK_ERROR, EINVAL)
    client.request(CMD_READ, 0, 4, handle=9)  # the connection goes on
    assert client.chunks()[-1].handle == 9


def test_dirty_bitmap_of_a_deleted_snapshot_is_an_error(connect: Connect, fake: Any) -> None:
    h = connect("vol", contexts=(BITMAP,))
    del fake.stores["vol@1"]
    with pytest.raises(nbd.Error) as info:
        block_status(h, CHUNK, 0)
    assert info.value.errnum == errno.EIO
    assert h.pread(4, 0)  # the connection goes on
