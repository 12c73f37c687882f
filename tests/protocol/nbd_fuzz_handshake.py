"""The fuzz harness's oracle for handshakes: what the server must answer to the bytes a
client sends during option haggling (Unix socket, no TLS), framed the way the spec frames
them, and a strict parser of the option replies (see nbd_fuzz_model.py for the idea).
"""

from __future__ import annotations

import struct

from nbd_fuzz_model import BASE, EXPORTS
from rawclient import (
    ERR,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    Cursor,
    Malformed,
)


def parse_go_handshake(cursor: Cursor, structured: bool, queries: tuple[str, ...]) -> dict:
    """The replies to [STRUCTURED_REPLY,] [SET_META_CONTEXT,] GO: the contexts, id -> name."""
    if cursor.take(18, "greeting") != struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3):
        raise Malformed("bad greeting")
    contexts = {}
    if structured:
        _final(cursor, 8, {REP_ACK})
    if queries:
        for kind, payload in _replies(cursor, 10):
            if kind == REP_META_CONTEXT:
                contexts[struct.unpack_from(">I", payload)[0]] = payload[4:].decode()
    if _replies(cursor, 7)[-1][0] != REP_ACK:
        raise Malformed("NBD_OPT_GO refused")
    return contexts


def _replies(cursor: Cursor, option: int) -> list[tuple[int, bytes]]:
    replies = []
    while True:
        magic, echoed, kind, length = cursor.unpack(">QIII", "option reply")
        if magic != OPTION_REPLY_MAGIC or echoed != option:
            raise Malformed(f"option reply {magic:#x} {echoed} to option {option}")
        replies.append((kind, cursor.take(length, "option reply payload")))
        if kind not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
            if kind != REP_ACK and not kind & ERR:
                raise Malformed(f"reply type {kind} to option {option}")
            return replies


def _final(cursor: Cursor, option: int, allowed: set[int]) -> list[tuple[int, bytes]]:
    replies = _replies(cursor, option)
    if replies[-1][0] not in allowed:
        raise Malformed(f"option {option} answered {replies[-1][0]:#x}, expected {allowed}")
    return replies


def _string(raw: bytes) -> str | int:
    """A protocol string, or the error its decoding gives."""
    if len(raw) > 4096:
        return REP_ERR_TOO_BIG
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return REP_ERR_INVALID
    return REP_ERR_INVALID if "\0" in text else text


def _counted(data: bytes, pos: int) -> tuple[bytes, int] | None:
    if pos + 4 > len(data):
        return None
    (size,) = struct.unpack_from(">I", data, pos)
    end = pos + 4 + size
    return (data[pos + 4 : end], end) if end <= len(data) else None


def option_outcome(option: int, data: bytes, structured: bool) -> tuple[set[int], str | None]:
    """(final replies allowed, what it leads to: "go", "structured" or None)."""
    if option == 3:
        return ({REP_ACK}, None) if not data else ({REP_ERR_INVALID}, None)
    if option == 5:
        return ({REP_ERR_INVALID} if data else {REP_ERR_POLICY}), None
    if option == 8:
        return ({REP_ACK}, "structured") if not data else ({REP_ERR_INVALID}, None)
    if option in (6, 7):
        return _info_outcome(data), ("go" if option == 7 else None)
    if option in (9, 10):
        if option == 10 and not structured:
            return {REP_ERR_INVALID}, None
        return _meta_outcome(data), None
    return {REP_ERR_UNSUP}, None


def _info_outcome(data: bytes) -> set[int]:
    named = _counted(data, 0)
    if named is None or named[1] + 2 > len(data):
        return {REP_ERR_INVALID}
    (count,) = struct.unpack_from(">H", data, named[1])
    if named[1] + 2 + 2 * count != len(data):
        return {REP_ERR_INVALID}
    return _name_outcome(named[0])


def _name_outcome(raw: bytes) -> set[int]:
    name = _string(raw)
    if isinstance(name, int):
        return {name}
    return {REP_ACK} if name in EXPORTS else {REP_ERR_UNKNOWN}


def _meta_outcome(data: bytes) -> set[int]:
    named = _counted(data, 0)
    if named is None or named[1] + 4 > len(data):
        return {REP_ERR_INVALID}
    name = _string(named[0])
    (count,) = struct.unpack_from(">I", data, named[1])
    pos, queries = named[1] + 4, []
    for _ in range(count):
        query = _counted(data, pos)
        if query is None:
            return {REP_ERR_INVALID}
        queries.append(_string(query[0]))
        pos = query[1]
    if pos != len(data):
        return {REP_ERR_INVALID}
    for item in (name, *queries):
        if isinstance(item, int):
            return {item}
    if name not in EXPORTS:
        return {REP_ERR_UNKNOWN}
    if any(not str(q).partition(":")[0] or ":" not in str(q) for q in queries):
        return {REP_ERR_INVALID}
    return {REP_ACK}


def check_handshake(stream: bytes, output: bytes) -> None:
    """Check the server's output for a fuzzed handshake `stream` (unix socket, no TLS)."""
    out, client = Cursor(output), Cursor(stream)
    if out.take(18, "greeting") != struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3):
        raise Malformed("bad greeting")
    if client.left() < 4:
        return _expect_end(out)
    (flags,) = client.unpack(">I", "client flags")
    structured = False
    if flags & ~3:
        return _expect_end(out)
    while client.left() >= 16:
        magic, option, length = client.unpack(">QII", "option header")
        if magic != IHAVEOPT or length > 65536 or client.left() < length:
            break
        data = client.take(length, "option data")
        if option != 1 and not flags & 1:
            break
        if option == 1:
            if _name_outcome(data) == {REP_ACK}:
                out.take(10 if flags & 2 else 134, "NBD_OPT_EXPORT_NAME reply")
                return  # transmission: the rest is the request fuzzer's business
            break
        if option == 2:
            _final(out, 2, {REP_ACK})
            break
        allowed, leads_to = option_outcome(option, data, structured)
        replies = _final(out, option, allowed)
        _check_intermediate(option, replies, data)
        if replies[-1][0] == REP_ACK and leads_to == "go":
            return
        structured |= replies[-1][0] == REP_ACK and leads_to == "structured"
    return _expect_end(out)


def _check_intermediate(option: int, replies: list[tuple[int, bytes]], data: bytes) -> None:
    kinds = [kind for kind, _ in replies[:-1]]
    if replies[-1][0] != REP_ACK:
        if kinds:
            raise Malformed(f"replies {kinds} before an error to option {option}")
        return
    wanted = {3: REP_SERVER, 6: REP_INFO, 7: REP_INFO, 9: REP_META_CONTEXT, 10: REP_META_CONTEXT}
    if any(kind != wanted.get(option) for kind in kinds):
        raise Malformed(f"replies {kinds} to option {option}")
    if option == 3 and len(kinds) != len(EXPORTS):
        raise Malformed(f"NBD_OPT_LIST gave {len(kinds)} exports")
    ids = [struct.unpack_from(">I", p)[0] for _, p in replies[:-1]] if option in (9, 10) else []
    if (option == 9 and any(ids)) or (option == 10 and (0 in ids or len(set(ids)) != len(ids))):
        raise Malformed(f"context ids {ids} for option {option}")
    if option in (9, 10):
        names = [p[4:].decode() for _, p in replies[:-1]]
        if names != _meta_names(data, listing=option == 9):
            raise Malformed(f"contexts {names} for option {option} with data {data!r}")


AVAILABLE = [BASE, "qemu:dirty-bitmap:vol@1"]  # on both exports
WILDCARDS = {"base:": AVAILABLE[:1], "qemu:": AVAILABLE[1:], "qemu:dirty-bitmap:": AVAILABLE[1:]}


def _meta_names(data: bytes, *, listing: bool) -> list[str]:
    """The contexts a well-formed meta-context option names (see session.py's notes)."""
    named = _counted(data, 0)
    assert named is not None
    (count,) = struct.unpack_from(">I", data, named[1])
    pos, names = named[1] + 4, []
    for _ in range(count):
        query = _counted(data, pos)
        assert query is not None
        pos, text = query[1], query[0].decode()
        found = WILDCARDS.get(text, []) if listing else []
        found = found or ([text] if text in AVAILABLE else [])
        names += [name for name in found if name not in names]
    return names if count or not listing else list(AVAILABLE)


def _expect_end(out: Cursor) -> None:
    if out.left():
        raise Malformed(f"{out.left()} more bytes where the server should have closed")
