"""The fuzz harness's oracle: what the server must answer to a byte stream, and a strict
parser of what it did answer.

The model reads the client's bytes the way the spec frames them (option headers, request
headers, write payloads) and predicts, message by message: a reply of a given kind, an
error from an allowed set, entering transmission, or the end of the connection. The checks
are the server's documented policy (docs/nbd.md), written again here from the spec:
- handshake (nbd_fuzz_handshake.py): bad client flags, bad option magic, an option over
  64 KiB, a non-fixed-newstyle client sending anything but NBD_OPT_EXPORT_NAME, a refused
  NBD_OPT_EXPORT_NAME: closed; unknown options: NBD_REP_ERR_UNSUP; malformed data:
  NBD_REP_ERR_INVALID (or TOO_BIG);
- transmission (here): bad request magic and write payloads over 64 MiB: closed; otherwise one
  reply per request (none for NBD_CMD_DISC) with the error the policy table gives.
Replies are parsed strictly: magic numbers, handles, chunk types and lengths, DONE flags,
chunks tiling a read exactly, one BLOCK_STATUS chunk per context; data is compared with
the export's contents, which the fuzz never changes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from rawclient import (
    CHUNK_DATA,
    CHUNK_ERROR,
    CHUNK_HOLE,
    CHUNK_NONE,
    CHUNK_STATUS,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    ENOTSUP,
    EPERM,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
    STRUCTURED_MAGIC,
    Cursor,
    Malformed,
)

MAX_LENGTH = 32 * 1024 * 1024
ABSURD = 64 * 1024 * 1024
CHUNK = 64 * 1024
BASE = "base:allocation"
EXPORTS = ("vol", "vol@1")
_ACCEPTED = {
    CMD_READ: FLAG_FUA | FLAG_DF,
    CMD_WRITE: FLAG_FUA,
    CMD_DISC: 0xFFFF,
    CMD_FLUSH: FLAG_FUA,
    CMD_TRIM: FLAG_FUA,
    CMD_CACHE: FLAG_FUA,
    CMD_WRITE_ZEROES: FLAG_FUA | FLAG_NO_HOLE | FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: FLAG_FUA | FLAG_REQ_ONE,
}


@dataclass
class Export:
    """What the model knows of an export: its contents (never changed by the fuzz) and,
    for the dirty bitmap, the snapshot's."""

    name: str
    data: bytes
    snapshot: bytes

    @property
    def readonly(self) -> bool:
        return "@" in self.name


@dataclass
class Session:
    export: Export
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)  # id -> name


# Transmission.


def outcome(session: Session, flags: int, cmd: int, offset: int, length: int) -> set[int] | str:
    """The errors allowed for a request (0: success), or "end" for NBD_CMD_DISC."""
    accepted = _ACCEPTED.get(cmd)
    if accepted is None:
        return {EINVAL}
    if cmd == CMD_DISC:
        return "end"
    if not session.structured:
        accepted &= ~FLAG_DF
    if flags & ~accepted:
        return {EINVAL}
    size, readonly = len(session.export.data), session.export.readonly
    past_end = offset + length > size
    if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and readonly:
        return {EPERM}
    if cmd in (CMD_READ, CMD_WRITE) and length > MAX_LENGTH:
        return {EINVAL}
    if cmd == CMD_FLUSH:
        return {EINVAL} if offset or length else {0}
    if cmd == CMD_BLOCK_STATUS and (not session.contexts or not length):
        return {EINVAL}
    if past_end:
        return {ENOSPC} if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else {EINVAL}
    if cmd == CMD_WRITE_ZEROES and flags & FLAG_FAST_ZERO and length:
        return {0, ENOTSUP}
    return {0}


@dataclass
class Expected:
    handle: int
    cmd: int
    flags: int
    offset: int
    length: int
    errors: set[int]


def frame_requests(stream: bytes, session: Session) -> tuple[list[Expected], bool]:
    """The requests the server must answer, and whether the stream ends cleanly (between
    two requests, or at NBD_CMD_DISC): if not, replies in flight may be abandoned."""
    cursor, expected = Cursor(stream), []
    while cursor.left():
        if cursor.left() < 28:
            return expected, False
        magic, flags, cmd, handle, offset, length = cursor.unpack(">IHHQQI", "request")
        if magic != REQUEST_MAGIC or (cmd == CMD_WRITE and length > ABSURD):
            return expected, False
        if cmd == CMD_WRITE:
            if cursor.left() < length:
                return expected, False
            cursor.take(length, "payload")
            if length > MAX_LENGTH:
                expected.append(Expected(handle, cmd, flags, offset, length, {EINVAL}))
                continue
        errors = outcome(session, flags, cmd, offset, length)
        if errors == "end":
            return expected, True
        assert isinstance(errors, set)
        expected.append(Expected(handle, cmd, flags, offset, length, errors))
    return expected, True


def check_replies(output: bytes, session: Session, stream: bytes) -> None:
    """Parse every reply in `output` and check it against the requests of `stream`."""
    expected, clean = frame_requests(stream, session)
    pending = {e.handle: e for e in expected}
    assert len(pending) == len(expected), "the harness reused a handle"
    replies: dict[int, list[tuple[int, int, bytes]]] = {}
    done: set[int] = set()
    cursor = Cursor(output)
    while cursor.left():
        magic = cursor.peek_u32()
        if magic == SIMPLE_MAGIC:
            _simple(cursor, session, pending, done)
        elif magic == STRUCTURED_MAGIC and session.structured:
            _chunk(cursor, pending, done, replies)
        else:
            raise Malformed(f"reply magic {magic!r} at {cursor.pos}")
    for handle, request in pending.items():
        if handle in done:
            _check_structured(request, replies.get(handle, []), session)
        elif clean:
            raise Malformed(f"no reply to {request}")


def _simple(cursor: Cursor, session: Session, pending: dict, done: set[int]) -> None:
    _, error, handle = cursor.unpack(">IIQ", "simple reply")
    request = pending.get(handle)
    if request is None or handle in done:
        raise Malformed(f"simple reply to unknown or answered handle {handle}")
    if error not in request.errors:
        raise Malformed(f"error {error} to {request}, expected {request.errors}")
    if session.structured and (request.cmd == CMD_READ or (not error and request.cmd == 7)):
        raise Malformed(f"a simple reply to {request} under structured replies")
    if request.cmd == CMD_READ and not error:
        data = cursor.take(request.length, "read data")
        if data != session.export.data[request.offset : request.offset + request.length]:
            raise Malformed(f"wrong data for {request}")
    done.add(handle)
    request.errors = {-1}  # answered: no structured chunks may follow


def _chunk(cursor: Cursor, pending: dict, done: set[int], replies: dict) -> None:
    _, flags, kind, handle, length = cursor.unpack(">IHHQI", "chunk header")
    payload = cursor.take(length, "chunk payload")
    if handle not in pending or handle in done:
        raise Malformed(f"chunk for unknown or finished handle {handle}")
    replies.setdefault(handle, []).append((flags, kind, payload))
    if flags & REPLY_FLAG_DONE:
        done.add(handle)


def _check_structured(request: Expected, chunks: list, session: Session) -> None:
    if request.errors == {-1}:
        if chunks:
            raise Malformed(f"chunks after a simple reply to {request}")
        return
    errors = [c for c in chunks if c[1] & 0x8000]
    if errors:
        flags, kind, payload = errors[0]
        error, size = struct.unpack_from(">IH", payload) if len(payload) >= 6 else (0, 0)
        if len(chunks) != 1 or kind != CHUNK_ERROR or size > len(payload) - 6:
            raise Malformed(f"bad error reply to {request}: {chunks}")
        if error not in request.errors:
            raise Malformed(f"error {error} to {request}, expected {request.errors}")
        return
    if 0 not in request.errors:
        raise Malformed(f"success for {request}, expected {request.errors}")
    if request.cmd == CMD_READ:
        _check_read(request, chunks, session.export.data)
    elif request.cmd == CMD_BLOCK_STATUS:
        _check_status(request, chunks, session)
    else:
        raise Malformed(f"a structured success to {request}")


def _check_read(request: Expected, chunks: list, data: bytes) -> None:
    spans = []
    for flags, kind, payload in chunks:
        if kind == CHUNK_NONE and not payload:
            continue
        if kind == CHUNK_DATA and len(payload) >= 9:
            (offset,) = struct.unpack_from(">Q", payload)
            size, content = len(payload) - 8, payload[8:]
        elif kind == CHUNK_HOLE and len(payload) == 12:
            offset, size = struct.unpack(">QI", payload)
            content = bytes(size)
        else:
            raise Malformed(f"bad read chunk {(flags, kind, len(payload))} for {request}")
        if not size or content != data[offset : offset + size]:
            raise Malformed(f"read chunk at {offset}+{size} has wrong data for {request}")
        spans.append((offset, offset + size))
    if request.flags & FLAG_DF and sum(1 for c in chunks if c[1] != CHUNK_NONE) > 1:
        raise Malformed(f"several content chunks under DF for {request}")
    position = request.offset
    for start, end in sorted(spans):
        if start != position:
            raise Malformed(f"read chunks of {request} leave a gap or overlap at {position}")
        position = end
    if position != request.offset + request.length:
        raise Malformed(f"read chunks of {request} end at {position}")


def _check_status(request: Expected, chunks: list, session: Session) -> None:
    seen = set()
    for flags, kind, payload in chunks:
        if kind != CHUNK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
            raise Malformed(f"bad block status chunk {(flags, kind, len(payload))}")
        (context,) = struct.unpack_from(">I", payload)
        if context not in session.contexts or context in seen:
            raise Malformed(f"block status for context {context}, selected {session.contexts}")
        seen.add(context)
        extents = list(struct.iter_unpack(">II", payload[4:]))
        if request.flags & FLAG_REQ_ONE and len(extents) != 1:
            raise Malformed(f"{len(extents)} extents under REQ_ONE")
        if any(not length for length, _ in extents):
            raise Malformed("a zero-length extent")
        if sum(length for length, _ in extents) > request.length:
            raise Malformed(f"extents past the requested length for {request}")
        _check_extents(session, session.contexts[context], request.offset, extents)
    if seen != set(session.contexts):
        raise Malformed(f"block status covered contexts {seen} of {session.contexts}")


def _check_extents(session: Session, name: str, offset: int, extents: list) -> None:
    data, snapshot = session.export.data, session.export.snapshot
    for length, flags in extents:
        piece = slice(offset, offset + length)
        if name == BASE and flags & 2 and data[piece] != bytes(length):
            raise Malformed(f"ZERO reported for {offset}+{length}, which holds data")
        if name != BASE and not flags & 1:
            first, last = offset // CHUNK * CHUNK, (offset + length + CHUNK - 1) // CHUNK * CHUNK
            if data[first:last] != snapshot[first:last]:
                raise Malformed(f"clean reported for {offset}+{length}, which differs")
        offset += length
