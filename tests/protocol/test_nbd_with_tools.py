"""Real clients (nbdinfo, qemu-io, qemu-img, nbdcopy) against the in-process server: they
handshake, move data and read the meta contexts. (tests/interop runs them against `serve`.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shadowblk.provider.api import ExportRegistry

Reference = Callable[[str, int, int], bytes]

MiB = 1024 * 1024


def run(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def test_nbdinfo_reads_both_exports(server: Any, registry: ExportRegistry) -> None:
    for name, _ in registry.export_names():
        info = json.loads(run("nbdinfo", "--json", server.uri(name)))
        (export,) = info["exports"]
        device = registry.open_export(name)
        device.close()
        assert export["export-size"] == device.size
        assert export["is_read_only"] == device.readonly
        assert export["can_flush"] and export["can_fua"]
        assert export["export-name"] == name


def test_nbdinfo_lists_exports(server: Any, registry: ExportRegistry) -> None:
    info = json.loads(run("nbdinfo", "--list", "--json", server.uri("")))
    listed = {e["export-name"]: e.get("description") for e in info["exports"]}
    assert listed == dict(registry.export_names())


def test_qemu_io_writes_and_reads(server: Any, reference: Reference) -> None:
    out = run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 65536 131072",
        "-c", "write -f -P 0xcd 1000 100",  # FUA
        "-c", "flush",
        "-c", "read -P 0xab 65536 131072",
        server.uri("vol"),
    )  # fmt: skip
    assert "Pattern verification failed" not in out
    assert reference("vol", 65536, 131072) == b"\xab" * 131072
    assert reference("vol", 1000, 100) == b"\xcd" * 100


def test_qemu_io_on_a_snapshot(server: Any, reference: Reference) -> None:
    out = run("qemu-io", "-r", "-f", "raw", "-c", "read -v 0 16", server.uri("vol@1"))
    assert reference("vol@1", 0, 16).hex(" ") in out.replace("  ", " ")
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 1 0 512", server.uri("vol@1")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Permission denied" in done.stderr  # read-only export: no read-write open


def test_qemu_io_reports_unknown_export(server: Any) -> None:
    done = subprocess.run(
        ["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", server.uri("nope")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "not available" in done.stderr and "nope" in done.stderr


def test_nbdcopy_copies_a_snapshot(server: Any, reference: Reference, tmp_path: Path) -> None:
    target = tmp_path / "copy.img"
    run("nbdcopy", server.uri("vol@1"), str(target))
    data = target.read_bytes()
    assert data == reference("vol@1", 0, len(data))
    assert len(data) == 16 * MiB


def test_qemu_img_info(server: Any, registry: ExportRegistry) -> None:
    info = json.loads(run("qemu-img", "info", "--output=json", server.uri("vol")))
    device = registry.open_export("vol")
    device.close()
    assert info["virtual-size"] == device.size


def test_nbdinfo_map_of_base_allocation_and_dirty_bitmap(
    server: Any, connect: Any, reference: Reference
) -> None:
    chunk = 64 * 1024
    h = connect("vol")
    h.pwrite(b"x" * 10, 7 * chunk + 3)
    h.zero(2 * chunk, 9 * chunk)
    for export in ("vol", "vol@1"):
        extents = json.loads(run("nbdinfo", "--map", "--json", server.uri(export)))
        assert sum(e["length"] for e in extents) == 16 * MiB
        for e in extents:
            if e["type"] & 2:  # zero
                assert reference(export, e["offset"], e["length"]) == bytes(e["length"])
    bitmap = "qemu:dirty-bitmap:vol@1"
    extents = json.loads(run("nbdinfo", f"--map={bitmap}", "--json", server.uri("vol")))
    dirty = {
        c
        for e in extents
        if e["type"] & 1
        for c in range(e["offset"] // chunk, (e["offset"] + e["length"] - 1) // chunk + 1)
    }
    assert {7, 9, 10} <= dirty
    for e in extents:
        if not e["type"] & 1:
            at, size = e["offset"], e["length"]
            assert reference("vol", at, size) == reference("vol@1", at, size)
