"""Crash cases the torture tests found, kept as deterministic regression tests."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shadowblk.provider.engine import Engine
from shadowblk.provider.fsck import check_consistency

CHUNK = 65536

# Each child: volume v of 16 chunks of bytes([1]), snapshot v@1, then its own steps, and
# os._exit(137) (the crash) at a chosen moment.
SETUP = """
import os, sys, threading, time
from shadowblk.provider import faults
from shadowblk.provider.engine import Engine

engine = Engine.open(sys.argv[1])
engine.create_volume("v", size=16 * 65536)
dev = engine.open_export("v")
dev.write(0, bytes([1]) * 16 * 65536)
engine.create_snapshot_set(["v"])
"""


def crash(steps: str, state: Path) -> None:
    """Run SETUP and `steps` in a child process, which must die by os._exit(137)."""
    script = SETUP + textwrap.dedent(steps)
    child = subprocess.run([sys.executable, "-c", script, str(state)], check=False, timeout=60)
    assert child.returncode == 137, f"the child ended with {child.returncode}, not the crash"


CHILD = """
    dev.write(0, bytes([2]) * 65536)  # chunks 0 and 3: preserved for v@1
    dev.write(3 * 65536, bytes([4]) * 65536)
    engine.create_snapshot_set(["v"])  # v@2 alone reads chunk 3 from the origin
    dev.flush()
    faults.arm("delete.forget=delay:1500")  # the delete waits before its commit
    threading.Thread(target=engine.delete_snapshot, args=("v@2",), daemon=True).start()
    time.sleep(0.5)
    dev.write(3 * 65536, bytes([3]) * 65536)  # a chunk only v@2 needs, during the delete
    dev.flush()
    os._exit(137)  # the crash, while the delete has not committed
    """


def test_a_write_during_an_uncommitted_delete_is_still_preserved(tmp_path: Path) -> None:
    # Found by test_fault_points (crash at delete.release): the delete dropped the
    # snapshot from memory before its commit, so this write went to the origin unpreserved
    # and the snapshot, still on disk after the crash, came back changed.
    state = tmp_path / "state"
    crash(CHILD, state)
    engine = Engine.open(state)
    try:
        assert [s.name for s in engine.snapshots()] == ["v@1", "v@2"]
        dev = engine.open_export("v@2")
        try:
            expected = bytearray(bytes([1]) * 16 * CHUNK)
            expected[0:CHUNK] = bytes([2]) * CHUNK
            expected[3 * CHUNK : 4 * CHUNK] = bytes([4]) * CHUNK
            assert dev.pread(0, 16 * CHUNK) == expected
        finally:
            dev.close()
        origin = engine.open_export("v")
        try:
            assert origin.pread(3 * CHUNK, CHUNK) == bytes([3]) * CHUNK
        finally:
            origin.close()
        assert check_consistency(engine) == []
    finally:
        engine.close()
    assert os.path.exists(state / "catalog.db")


CHILD_NO_DRAIN = """
    dev.flush()
    faults.arm("preserve.write=delay:30000")  # the preserver stalls on its first copy
    dev.write(2 * 65536 + 4096, bytes([2]) * 4096)  # acknowledged into overlays, journaled
    dev.write(5 * 65536, bytes([5]) * 4096)
    dev.zero(7 * 65536, 4096, punch=False)
    engine.create_snapshot_set(["v"])  # v@2, with those three preserves still pending
    dev.write(9 * 65536, bytes([9]) * 4096)  # a chunk v@2 needs preserved
    dev.flush()
    os._exit(137)  # the crash: not one preserve committed
    """


def test_overlay_writes_journaled_before_their_preserve_survive_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Snapshot creation does not wait for preserves: the writes in overlays are durable
    # through the journal alone. Replaying them must preserve first what they overwrite,
    # for each snapshot that needs it, or v@1 would come back with v@2's bytes.
    state = tmp_path / "state"
    crash(CHILD_NO_DRAIN, state)
    with caplog.at_level(logging.WARNING, logger="shadowblk.engine"):
        engine = Engine.open(state)
    try:
        old = bytes([1]) * 16 * CHUNK
        second = bytearray(old)
        second[2 * CHUNK + 4096 : 2 * CHUNK + 8192] = bytes([2]) * 4096
        second[5 * CHUNK : 5 * CHUNK + 4096] = bytes([5]) * 4096
        second[7 * CHUNK : 7 * CHUNK + 4096] = bytes(4096)
        live = bytearray(second)
        live[9 * CHUNK : 9 * CHUNK + 4096] = bytes([9]) * 4096
        for name, expected in (("v@1", old), ("v@2", second), ("v", live)):
            dev = engine.open_export(name)
            try:
                assert dev.pread(0, 16 * CHUNK) == expected, f"{name} after the crash"
            finally:
                dev.close()
        assert check_consistency(engine) == []
        assert "preserved 4 chunks that journaled writes overwrite" in caplog.text
    finally:
        engine.close()
