"""The writeback thread's background work, seen from outside the engine: the catalog's
commits reach the database file itself, and an origin journal's records are checkpointed,
with no FLUSH, snapshot or stop asking for it.

The waits below are liveness bounds (the work is due within about a second), not timing
assertions: they fail only if the work never happens.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from shadowblk.provider.engine import Engine
from shadowblk.provider.journal import NAME as JOURNAL
from shadowblk.provider.journal import Journal

PATIENCE = 30.0  # seconds


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {PATIENCE:g} s")
        time.sleep(0.05)


def test_catalog_commits_reach_the_database_file_without_a_commit_paying(
    engine: Engine, tmp_path: Path
) -> None:
    engine.create_volume("v", size=1 << 20)  # a commit: in the WAL first

    def in_database_file() -> bool:
        # the database file alone, without its WAL: only a checkpoint puts the row there
        copy = tmp_path / "alone.db"
        shutil.copyfile(engine.state_dir / "catalog.db", copy)
        db = sqlite3.connect(copy)
        try:
            return db.execute("SELECT name FROM volumes").fetchall() == [("v",)]
        except sqlite3.OperationalError:  # not even the schema there yet
            return False
        finally:
            db.close()

    wait_for(in_database_file, "the volume's row in catalog.db itself")


def test_a_journal_is_checkpointed_in_the_background(engine: Engine) -> None:
    engine.create_volume("v", size=1 << 20)
    dev = engine.open_export("v")
    try:
        dev.write(8192, b"j" * 4096)
    finally:
        dev.close()
    vol = engine._volume("v")
    journal = vol.origin.journal
    assert journal is not None and journal.used() > 0
    uuid = vol.row["uuid"]

    def header_moved() -> bool:
        # the durable header, read through a file descriptor of its own
        on_disk = Journal.open(vol.diff.path / JOURNAL, uuid)
        try:
            return on_disk.start == journal.head
        finally:
            on_disk.close()

    wait_for(header_moved, "a checkpoint moving the journal's start past the write")
