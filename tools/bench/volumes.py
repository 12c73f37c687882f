"""shadowblk volumes for the sections: adopt an image, write slices, build snapshot chains.

Slices are written through the volume's NBD export with libnbd (python3-libnbd), in the
bench process: one 4 KiB write into each chosen chunk, at a random 4 KiB block of it, then
a FLUSH. Every snapshot of a chain is taken after such a slice, so the chunks' entries
really form chains across epochs. Snapshots are created at the control socket.
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import nbd

from . import runner
from .core import KiB

CHUNK = 64 * KiB  # shadowblk's default chunk size, and the qcow2 peer's cluster size
BLOCK = 4 * KiB


@contextmanager
def adopted(state_dir: Path, image: Path, name: str = "vol",
            chunk_size: int = CHUNK) -> Iterator[runner.Shadowblk]:  # fmt: skip
    """A service on `state_dir` whose volume `name` adopts `image` (`volume create
    --backing`); the service stops, and the image is released, on exit."""
    with runner.shadowblk(state_dir, export=name) as server:
        with server.control() as control:
            control.call("volume.create", name=name, backing=os.fspath(image.resolve()),
                         chunk_size=chunk_size)  # fmt: skip
        yield server


def snapshot(control: Any, volume: str) -> str:
    result = control.call("snapshot.create", volumes=[volume])
    return str(result["snapshots"][0]["name"])


def volume_stats(control: Any, volume: str) -> dict[str, Any]:
    stats: dict[str, Any] = control.call("stats")["engine"]["volumes"][volume]
    return stats


class Writer:
    """A libnbd connection to one export, for slices."""

    def __init__(self, uri: str, seed: int = 7) -> None:
        self.handle = nbd.NBD()
        self.handle.connect_uri(uri)
        self.rng = random.Random(seed)
        self.block = self.rng.randbytes(BLOCK)

    def write_chunks(self, chunks: list[int], chunk_size: int = CHUNK) -> None:
        """One 4 KiB write into each chunk, then a FLUSH."""
        blocks = chunk_size // BLOCK
        for chunk in chunks:
            offset = chunk * chunk_size + self.rng.randrange(blocks) * BLOCK
            self.handle.pwrite(self.block, offset)
        self.handle.flush()

    def close(self) -> None:
        self.handle.shutdown()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()


def build_chain(
    server: runner.Shadowblk,
    count: int,
    slice_chunks: Callable[[int], list[int]],
    export: str | None = None,
) -> None:
    """Take `count` snapshots of volume `export` (default: the server's); before snapshot
    n, write the chunks `slice_chunks(n)`."""
    export = export or server.export
    with server.control() as control, Writer(server.uri(export)) as writer:
        for n in range(1, count + 1):
            chunks = slice_chunks(n)
            if chunks:
                writer.write_chunks(chunks)
            snapshot(control, export)


def catalog_bytes(state_dir: Path) -> int:
    """Bytes of the catalog (database and WAL) after a WAL checkpoint."""
    db = state_dir / "catalog.db"
    with closing(sqlite3.connect(db, timeout=60)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    wal = db.with_name(db.name + "-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
