"""`shadowblk revert` on a real service: who may be connected, and a SIGKILL midway."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nbd
import pytest
from exports import connect, export_sha256

MiB = 1 << 20


def scene(service: Any, size: int) -> str:
    """A volume, v@1 of it, then most of it overwritten; v@1's sha256."""
    service.cli.run("volume", "create", "v", "--size", str(size), "--sparse")
    h = connect(service, "v")
    for offset in range(0, size, 16 * MiB):  # requests are 32 MiB at most
        h.pwrite(os.urandom(min(16 * MiB, size - offset)), offset)
    h.flush()
    service.cli.run("create", "v")
    expected = export_sha256(service, "v@1")
    for offset in range(65536, size - 2 * 65536, 16 * MiB):
        h.pwrite(os.urandom(min(16 * MiB, size - 2 * 65536 - offset)), offset)
    h.flush()
    service.cli.run("create", "v")
    h.shutdown()
    return expected


def test_revert_with_writers_connected(service: Any) -> None:
    expected = scene(service, 8 * MiB)
    writer = connect(service, "v")
    refused = service.cli.run("revert", "v@1", expect=1)
    assert "busy" in refused.stderr and "--force" in refused.stderr
    out = service.cli.run("revert", "v@1", "--force").stdout
    assert "v reverted to v@1" in out and "deleted: v@1, v@2" in out
    with pytest.raises(nbd.Error):  # that client was disconnected
        writer.pread(512, 0)
    assert export_sha256(service, "v") == expected
    assert service.cli.json("list") == []


def test_revert_is_refused_while_the_fuse_file_is_open(service: Any) -> None:
    scene(service, 4 * MiB)
    with open(service.state_dir / "fuse" / "v", "rb"):
        refused = service.cli.run("revert", "v@1", "--force", expect=1)
        assert "busy" in refused.stderr and "FUSE file" in refused.stderr
    service.cli.run("revert", "v@1")


def test_revert_survives_sigkill(
    service_factory: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = short_tmp / "reverting"
    monkeypatch.setenv("SHADOWBLK_FAULTS", "revert.copy=crash@200")  # midway: 1021 to copy
    svc = service_factory(state)
    expected = scene(svc, 64 * MiB)
    died = svc.cli.run("revert", "v@1", expect=None)
    assert died.returncode != 0
    assert svc.process.wait(timeout=60) == 137  # the fault point crashed it
    svc.killed = True
    monkeypatch.delenv("SHADOWBLK_FAULTS")
    again = service_factory(state)
    assert "finishing the revert a crash interrupted" in again.log()
    assert export_sha256(again, "v") == expected
    assert again.cli.json("list") == []
