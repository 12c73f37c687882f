"""What a connection has negotiated, and the meta contexts it can negotiate.

A `Session` is created with the connection and changed only by option handlers in the
handshake (handshake.py, negotiate.py); the transmission phase reads it.

Meta contexts served (the syntax of queries, as the spec asks servers to document it):
- `base:allocation` on every export: HOLE and ZERO runs from `BlockDevice.extents`.
- `qemu:dirty-bitmap:VOLUME@N` for each snapshot `BlockDevice.dirty_bitmaps()` names: the
  chunks that differ between the export and that snapshot (`dirty_extents`), flag 1 = dirty.
- NBD_OPT_LIST_META_CONTEXT: no query lists every context of the export; `base:` lists
  `base:allocation`; `qemu:` and `qemu:dirty-bitmap:` list every dirty bitmap; a full name
  lists itself if the export has it. NBD_OPT_SET_META_CONTEXT selects full names only (the
  wildcards select nothing, as the spec says). Queries in unknown namespaces and unknown
  leaf names are ignored; a query without a `namespace:` prefix is NBD_REP_ERR_INVALID.
- Context ids are stable for the connection: a name keeps the id it first got, across
  repeated NBD_OPT_SET_META_CONTEXT. The selection belongs to the export it was made for:
  NBD_OPT_GO or NBD_OPT_EXPORT_NAME of another name drops it, NBD_OPT_STARTTLS drops it
  (with structured replies), and a new NBD_OPT_SET_META_CONTEXT replaces it even if it fails.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from ..api import BlockDevice
from .protocol import (
    CONTEXT_BASE_ALLOCATION,
    MAX_REQUEST_LENGTH,
    QEMU_DIRTY_BITMAP,
    REP_ERR_INVALID,
    OptionError,
)

_LIST_WILDCARDS = {
    "base:": lambda name: name == CONTEXT_BASE_ALLOCATION,
    "qemu:": lambda name: name.startswith(QEMU_DIRTY_BITMAP),
    QEMU_DIRTY_BITMAP: lambda name: name.startswith(QEMU_DIRTY_BITMAP),
}


@dataclass
class Session:
    """Negotiated state. `tls_context` is the listener's: when set, TLS is required."""

    tls_context: ssl.SSLContext | None = None
    fixed_newstyle: bool = False
    no_zeroes: bool = False
    structured_replies: bool = False
    meta_export: str | None = None  # the export the selected contexts belong to
    contexts: dict[int, str] = field(default_factory=dict)  # id -> name, in id order
    _ids: dict[str, int] = field(default_factory=dict)  # every name ever given an id

    def context_id(self, name: str) -> int:
        """The connection-stable id of a context name (ids start at 1)."""
        return self._ids.setdefault(name, len(self._ids) + 1)

    def select_contexts(self, export: str, names: list[str]) -> dict[int, str]:
        self.meta_export = export
        self.contexts = {self.context_id(name): name for name in names}
        return self.contexts

    def clear_contexts(self) -> None:
        self.meta_export = None
        self.contexts = {}

    def enter_export(self, export: str) -> None:
        """NBD_OPT_GO / NBD_OPT_EXPORT_NAME: contexts chosen for another export lapse."""
        if self.meta_export != export:
            self.clear_contexts()

    def reset_after_starttls(self) -> None:
        """The spec: no negotiation state survives NBD_OPT_STARTTLS."""
        self.structured_replies = False
        self.clear_contexts()


def available_contexts(device: BlockDevice) -> list[str]:
    """Every context the export offers (calls the engine: run it in a worker thread)."""
    bitmaps = [QEMU_DIRTY_BITMAP + name for name in device.dirty_bitmaps()]
    return [CONTEXT_BASE_ALLOCATION, *bitmaps]


def match_queries(queries: tuple[str, ...], available: list[str], *, listing: bool) -> list[str]:
    """The contexts `queries` name, each once, in query order (see the module notes)."""
    if listing and not queries:
        return list(available)
    found: list[str] = []
    for query in queries:
        namespace, colon, _ = query.partition(":")
        if not colon or not namespace:
            raise OptionError(REP_ERR_INVALID, f"meta context query {query!r} has no namespace")
        wildcard = _LIST_WILDCARDS.get(query)
        if wildcard is not None:
            matches = [name for name in available if wildcard(name)] if listing else []
        else:
            matches = [query] if query in available else []
        found.extend(name for name in matches if name not in found)
    return found


def preferred_block_size(device: BlockDevice) -> int:
    """The engine's chunk size, at least 4096 (a write of whole chunks needs no
    read-modify-write and no partial copy-on-write)."""
    size = device.chunk_size
    if 4096 <= size <= MAX_REQUEST_LENGTH and size & (size - 1) == 0:
        return size
    return 4096
