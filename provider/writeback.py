"""Origin writeback: keep the origins' dirty pages moving to disk between syncs.

Snapshot creation and FLUSH fdatasync the origin, and an fdatasync costs what is dirty
(about 40 µs per scattered 4 KiB page on the disks here): under a steady write load, a
creation paid for every page written since the previous one. This thread starts the
writeback of a written origin (sync_file_range WRITE: asynchronous, no durability promise)
at most every INTERVAL, so an fdatasync finds little left to write, as RocksDB's
bytes_per_sync does for its files. Durability is unchanged: only fdatasync promises.

It sleeps until an origin becomes dirty (`Origin.on_dirty` pokes it), so an idle service
does not wake up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from .origin import Origin

log = logging.getLogger(__name__)

INTERVAL = 0.005  # seconds between two writebacks of the same origin, at most


class Writeback:
    def __init__(self, origins: Callable[[], Iterable[Origin]]) -> None:
        self._origins = origins  # the open origins, now (called from the thread)
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
        while True:
            self._wake.wait()
            if self._stopping:
                return
            self._wake.clear()
            try:
                for origin in list(self._origins()):
                    origin.start_writeback()
            except Exception:  # advisory work: never let it take the engine down
                log.exception("origin writeback failed")
            threading.Event().wait(INTERVAL)
