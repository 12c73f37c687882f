"""The catalog: one SQLite database per state directory, the one schema of shadowblk.

Design notes
- One catalog holds every volume of the state directory, so a snapshot set spanning several
  volumes commits in one transaction (I3).
- WAL mode with synchronous=FULL: a committed transaction is durable when `commit` returns.
- The connection is shared by the service's threads; `transaction()` serializes writers
  with a lock, and readers take the same lock (they are rare: the engine keeps the index in
  memory and reads the catalog only at open).
- WAL checkpoints never run in a commit: SQLite's automatic checkpoint (copying the WAL
  into the database and fsyncing it, tens of milliseconds under load) would land on
  whichever commit crossed its threshold, a preserve batch or a snapshot set's. The
  service calls `checkpoint` from a background thread instead (PASSIVE, on a connection
  of its own: it neither waits for nor blocks a writer); closing checkpoints the rest.
- The format version lives in `meta`; an unknown newer version is refused, older ones are
  migrated in `_migrate`.

The byte-level layout of the diff area and the crash ordering are in docs/format.md.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FormatError

FORMAT_VERSION = 5  # 2: per-4 KiB-block checksums; 3: max_snapshots; 4: revert_epoch;
# 5: origin journals in the diff areas (an older shadowblk would not replay them)

SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE volumes (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    uuid        TEXT NOT NULL UNIQUE,
    size        INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL,
    origin      TEXT NOT NULL,
    origin_kind TEXT NOT NULL CHECK (origin_kind IN ('file', 'block')),
    owned       INTEGER NOT NULL,          -- 1: shadowblk created the origin file
    diff_area   TEXT NOT NULL,             -- the volume's own diff-area directory
    max_diff    INTEGER,                   -- NULL: no fixed limit (filesystem floor only)
    full_policy TEXT NOT NULL,
    sparse      INTEGER NOT NULL,
    epoch       INTEGER NOT NULL DEFAULT 0,   -- the current epoch
    next_seq    INTEGER NOT NULL DEFAULT 1,   -- N of the next VOLUME@N, never reused
    created     TEXT NOT NULL,
    legacy_checksums INTEGER NOT NULL DEFAULT 0,  -- 1: hashes still in format 1's form
    max_snapshots INTEGER NOT NULL DEFAULT 512,   -- live snapshots at most
    revert_epoch INTEGER                          -- a revert to this epoch is under way
);
CREATE TABLE snapsets (
    id      TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    label   TEXT
);
CREATE TABLE snapshots (
    id        TEXT PRIMARY KEY,
    volume_id INTEGER NOT NULL REFERENCES volumes(id),
    seq       INTEGER NOT NULL,
    epoch     INTEGER NOT NULL,
    set_id    TEXT NOT NULL REFERENCES snapsets(id),
    created   TEXT NOT NULL,
    state     TEXT NOT NULL,
    label     TEXT,
    attrs     TEXT NOT NULL DEFAULT '{}',
    UNIQUE (volume_id, seq),
    UNIQUE (volume_id, epoch)
);
-- A preserved chunk: (chunk, epoch) -> where in the diff area, and its checksum: the
-- xxh3-64 of each 4 KiB block, concatenated (format 1: one xxh3-128 of the chunk).
-- slot and hash are NULL for a zero entry (the chunk read as zeroes: nothing copied).
CREATE TABLE chunks (
    volume_id INTEGER NOT NULL,
    chunk     INTEGER NOT NULL,
    epoch     INTEGER NOT NULL,
    slot      INTEGER,
    hash      BLOB,
    PRIMARY KEY (volume_id, chunk, epoch)
) WITHOUT ROWID;
"""


class Catalog:
    """The SQLite catalog of a state directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self.commits = 0  # transactions committed, for the background checkpoint
        self.on_commit: Callable[[], None] | None = None  # told after each commit
        self._ckpt_db: sqlite3.Connection | None = None
        try:
            self.db = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=30
            )
            self._configure()
            self._check_format()
        except sqlite3.DatabaseError as e:
            raise FormatError(f"catalog {path} is unreadable: {e}") from e

    def _configure(self) -> None:
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise FormatError(f"catalog {self.path}: cannot enable WAL mode (got {mode})")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # see `checkpoint`

    def _check_format(self) -> None:
        tables = {
            r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not tables:
            with self.transaction() as db:
                db.executescript_in_txn(SCHEMA)
            return
        if "meta" not in tables:
            raise FormatError(f"catalog {self.path} is not a shadowblk catalog (no meta table)")
        row = self.db.execute("SELECT value FROM meta WHERE key='format_version'").fetchone()
        if row is None:
            raise FormatError(f"catalog {self.path} has no format version")
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise FormatError(f"catalog {self.path} has an unreadable format version") from None
        if version > FORMAT_VERSION:
            raise FormatError(
                f"catalog {self.path} has format version {version}; this shadowblk reads "
                f"up to {FORMAT_VERSION}: upgrade shadowblk"
            )
        self._migrate(version)

    def _migrate(self, version: int) -> None:
        """Bring an older catalog to FORMAT_VERSION, in one transaction.

        4 -> 5: nothing in the catalog; from 5 on, a volume's origin may be current only
        with its journal replayed (provider/journal.py), which the engine creates at open.
        3 -> 4: volumes.revert_epoch (NULL: no revert under way).
        2 -> 3: volumes.max_snapshots (default 512, as before).
        1 -> 2: checksums became per 4 KiB block. The catalog cannot recompute them (the
        data is in the diff areas): it marks every volume `legacy_checksums`, and the
        engine rehashes a marked volume's chunks when it opens it."""
        if version < 1:
            raise FormatError(f"catalog {self.path} has invalid format version {version}")
        if version == FORMAT_VERSION:
            return
        with self.transaction() as t:
            if version < 2:
                t.execute(
                    "ALTER TABLE volumes ADD COLUMN legacy_checksums INTEGER NOT NULL DEFAULT 0"
                )
                t.execute("UPDATE volumes SET legacy_checksums=1")
            if version < 4:
                t.execute("ALTER TABLE volumes ADD COLUMN revert_epoch INTEGER")
            if version < 3:
                t.execute(
                    "ALTER TABLE volumes ADD COLUMN max_snapshots INTEGER NOT NULL DEFAULT 512"
                )
            t.execute("UPDATE meta SET value=? WHERE key='format_version'", (str(FORMAT_VERSION),))

    @contextmanager
    def transaction(self) -> Iterator[_Txn]:
        """BEGIN IMMEDIATE ... COMMIT, durable on exit; rolled back on any exception."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield _Txn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            self.commits += 1
        if self.on_commit is not None:
            self.on_commit()

    def checkpoint(self) -> None:
        """Copy the committed WAL into the database, durably, without blocking commits
        (PRAGMA wal_checkpoint(PASSIVE) on a connection of its own). One caller thread."""
        if self._ckpt_db is None:
            self._ckpt_db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30
            )
            self._ckpt_db.execute("PRAGMA synchronous=FULL")
        self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self.db.execute(sql, params)
            cur.row_factory = sqlite3.Row
            return cur.fetchall()

    def iter_chunks(self, volume_id: int) -> Iterator[tuple[int, int, int | None, bytes | None]]:
        """Every preserved chunk of a volume as (chunk, epoch, slot, hash), ordered."""
        with self._lock:
            cur = self.db.execute(
                "SELECT chunk, epoch, slot, hash FROM chunks WHERE volume_id=? "
                "ORDER BY chunk, epoch",
                (volume_id,),
            )
            yield from cur

    def close(self) -> None:
        """Close (the last connection to close checkpoints the whole WAL)."""
        with self._lock:
            if self._ckpt_db is not None:
                self._ckpt_db.close()
            self.db.close()


class _Txn:
    """The handle a transaction body gets: execute and executemany on the open transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[object, ...]]) -> sqlite3.Cursor:
        return self._db.executemany(sql, rows)

    def insert_chunks(self, rows: list[tuple[int, int, int, int | None, bytes | None]]) -> None:
        """Preserved entries: (volume_id, chunk, epoch, slot or None, hash or None)."""
        self._db.executemany(
            "INSERT INTO chunks (volume_id, chunk, epoch, slot, hash) VALUES (?,?,?,?,?)", rows
        )

    def executescript_in_txn(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('format_version', ?)", (str(FORMAT_VERSION),)
        )
