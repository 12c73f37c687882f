"""Origin writeback: keep the origins' dirty pages moving to disk between checkpoints.

FLUSH and snapshot creation sync an origin's journal (provider/journal.py); the origin
itself is made durable by a checkpoint, an fdatasync that costs what is dirty (about 40 µs
per scattered 4 KiB page on the disks here). This thread starts the writeback of a written
origin (sync_file_range WRITE: asynchronous, no durability promise) at most every INTERVAL,
so a checkpoint (or a sync that must checkpoint) finds little left to write, as RocksDB's
bytes_per_sync does for its files. Durability is unchanged: only fdatasync promises.

The same thread runs the origins' checkpoints (provider/journal.py): when a journal is a
quarter full, or CHECKPOINT_AGE after the last checkpoint if anything waits for one; and the
catalog's WAL checkpoint (provider/catalog.py), at most every CATALOG_INTERVAL while it
commits, so no commit on the path of a write or a snapshot creation pays for one.

It sleeps until an origin becomes dirty (`Origin.on_dirty` pokes it), or while a checkpoint
waits, CHECKPOINT_AGE: an idle service does not wake up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from .catalog import Catalog
from .origin import Origin

log = logging.getLogger(__name__)

INTERVAL = 0.005  # seconds between two writebacks of the same origin, at most
CHECKPOINT_AGE = 1.0  # seconds a journal record waits for its checkpoint, about
CATALOG_INTERVAL = 0.5  # seconds between two catalog checkpoints, at least


class Writeback:
    def __init__(
        self, origins: Callable[[], Iterable[Origin]], catalog: Catalog | None = None
    ) -> None:
        self._origins = origins  # the open origins, now (called from the thread)
        self._catalog = catalog
        self._catalog_seen = 0  # its commit count at the last checkpoint
        self._catalog_at = 0.0
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="writeback", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """An origin became dirty (any thread)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        waiting = False  # some origin waits for a checkpoint
        while True:
            self._wake.wait(CHECKPOINT_AGE if waiting else None)
            if self._stopping:
                return
            self._wake.clear()
            try:
                origins = list(self._origins())
                for origin in origins:
                    origin.start_writeback()
                    origin.background_checkpoint(CHECKPOINT_AGE)
                waiting = any(origin.checkpoint_waiting() for origin in origins)
                waiting = self._catalog_checkpoint() or waiting
            except Exception:  # advisory work: never let it take the engine down
                log.exception("origin writeback failed")
            threading.Event().wait(INTERVAL)

    def _catalog_checkpoint(self) -> bool:
        """Checkpoint the catalog if it committed since the last time and CATALOG_INTERVAL
        has passed; True if commits still wait for one."""
        catalog = self._catalog
        if catalog is None or catalog.commits == self._catalog_seen:
            return False
        if time.monotonic() - self._catalog_at < CATALOG_INTERVAL:
            return True
        self._catalog_seen = catalog.commits
        catalog.checkpoint()
        self._catalog_at = time.monotonic()
        return False
