"""Option haggling through python3-libnbd: list, info, go, export-name, abort, refusals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nbd
import pytest

from shadowblk.provider.api import ExportRegistry

Connect = Callable[..., Any]
Reference = Callable[[str, int, int], bytes]

MiB = 1024 * 1024


def test_list_names_every_export(connect: Connect, registry: ExportRegistry) -> None:
    h = connect("", opt_mode=True)
    seen: list[tuple[str, str]] = []

    def collect(name: str, description: str) -> int:
        seen.append((name, description))
        return 0

    count = h.opt_list(collect)
    assert count == len(seen)
    assert seen == registry.export_names()
    h.opt_abort()


def test_info_describes_the_export_without_entering_transmission(
    connect: Connect, registry: ExportRegistry
) -> None:
    h = connect("vol@1", opt_mode=True, full_info=True)
    h.opt_info()
    device = registry.open_export("vol@1")
    try:
        assert h.get_size() == device.size
        assert h.is_read_only()
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        assert h.get_block_size(nbd.SIZE_PREFERRED) == max(4096, device.chunk_size)
    finally:
        device.close()
    assert h.get_canonical_export_name() == "vol@1"
    assert h.get_export_description() == dict(registry.export_names())["vol@1"]
    assert h.aio_is_negotiating()
    h.set_export_name("vol")
    h.opt_info()
    assert not h.is_read_only()
    h.opt_abort()


def test_go_enters_transmission(
    connect: Connect, registry: ExportRegistry, reference: Reference
) -> None:
    h = connect("vol", opt_mode=True)
    h.opt_go()
    assert h.aio_is_ready()
    assert not h.is_read_only()
    assert h.get_structured_replies_negotiated()
    assert h.can_flush() and h.can_fua() and h.can_multi_conn() and h.can_cache()
    assert h.can_trim() and h.can_zero() and h.can_fast_zero() and h.can_df()
    assert not h.is_rotational()
    assert h.pread(4096, 8192) == reference("vol", 8192, 4096)


def test_snapshot_offers_no_write_commands(connect: Connect) -> None:
    h = connect("vol@1")
    assert h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_multi_conn() and h.can_cache()
    assert not h.can_trim() and not h.can_zero() and not h.can_fast_zero()


def test_go_to_unknown_export_is_refused_and_haggling_goes_on(
    connect: Connect, reference: Reference
) -> None:
    h = connect("nope", opt_mode=True)
    with pytest.raises(nbd.Error):
        h.opt_go()
    assert h.aio_is_negotiating()
    h.set_export_name("vol@1")
    h.opt_go()
    assert h.is_read_only()
    assert h.pread(512, 0) == reference("vol@1", 0, 512)


def test_info_on_unknown_export_is_refused(connect: Connect) -> None:
    h = connect("vol@99", opt_mode=True)
    with pytest.raises(nbd.Error):
        h.opt_info()
    assert h.aio_is_negotiating()
    h.opt_abort()


@pytest.mark.parametrize("flags", [0, nbd.HANDSHAKE_FLAG_NO_ZEROES], ids=["zeroes", "no-zeroes"])
def test_export_name_without_fixed_newstyle(
    connect: Connect, reference: Reference, flags: int
) -> None:
    """libnbd falls back to NBD_OPT_EXPORT_NAME; a wrong 124-byte padding would desync it."""
    h = connect("vol", handshake_flags=flags)
    assert h.get_handshake_flags() == flags
    assert h.get_protocol() == "newstyle"
    assert h.pread(65536, MiB) == reference("vol", MiB, 65536)
    h.pwrite(b"\xa5" * 512, 0)
    assert reference("vol", 0, 512) == b"\xa5" * 512


def test_export_name_of_unknown_export_closes(connect: Connect) -> None:
    with pytest.raises(nbd.Error):
        connect("nope", handshake_flags=0)
    assert connect("vol", handshake_flags=0).get_size() > 0


def test_abort_ends_the_session(connect: Connect) -> None:
    h = connect("vol", opt_mode=True)
    h.opt_abort()
    assert h.aio_is_closed()


def test_structured_replies_are_negotiated_on_request(
    connect: Connect, reference: Reference
) -> None:
    h = connect("vol", request_structured_replies=True)
    assert h.get_structured_replies_negotiated() and h.can_df()
    assert h.pread(512, 0) == reference("vol", 0, 512)
    h = connect("vol", request_structured_replies=False)
    assert not h.get_structured_replies_negotiated()
    assert not h.can_df()  # the spec: DF only with structured replies
    assert not h.can_meta_context("base:allocation")
    assert h.pread(512, 0) == reference("vol", 0, 512)


@pytest.mark.parametrize("export", ["vol", "vol@1"])
def test_block_sizes_are_sent_even_unasked(
    connect: Connect, registry: ExportRegistry, export: str
) -> None:
    """Our maximum (32 MiB) is below the spec's default, so INFO_BLOCK_SIZE always comes."""
    h = connect(export, request_block_size=False)
    device = registry.open_export(export)
    device.close()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == max(4096, device.chunk_size)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB


def test_read_only_flag_follows_the_device(connect: Connect, registry: ExportRegistry) -> None:
    for name, _ in registry.export_names():
        device = registry.open_export(name)
        try:
            h = connect(name)
            assert h.is_read_only() == device.readonly
            assert h.get_size() == device.size
        finally:
            device.close()


def test_export_released_when_client_aborts(connect: Connect, fake: Any) -> None:
    h = connect("vol@1", opt_mode=True)
    h.opt_info()
    h.opt_abort()
    assert fake.open_devices == []  # NBD_OPT_INFO closes what it opened before replying
