"""NBD by hand, for malformed and low-level exchanges: numbers from the spec, a blocking
raw-socket client, and a parser of server output for the fuzz harness.

The numbers are written out here from doc/proto.md, not imported from the server, so that
a wrong constant in the server cannot agree with itself.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

TIMEOUT = 30.0

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR = 2**31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR + 1, ERR + 2, ERR + 3
REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = ERR + 5, ERR + 6, ERR + 9
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 4, 5, 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO = 1, 2, 4, 8, 16
T_HAS_FLAGS, T_READ_ONLY, T_FLUSH, T_FUA, T_ROTATIONAL = 1, 2, 4, 8, 16
T_TRIM, T_WRITE_ZEROES, T_DF, T_MULTI_CONN, T_CACHE, T_FAST_ZERO = 32, 64, 128, 256, 1024, 2048
REPLY_FLAG_DONE = 1
CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE, CHUNK_STATUS = 0, 1, 2, 5
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 2**15 + 1, 2**15 + 2
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 22, 28, 75, 95

OPTION = struct.Struct(">QII")
REQUEST = struct.Struct(">IHHQQI")


def info_data(name: str, *infos: int) -> bytes:
    raw_name = name.encode()
    packed = struct.pack(f">H{len(infos)}H", len(infos), *infos)
    return struct.pack(">I", len(raw_name)) + raw_name + packed


def meta_data(name: str, *queries: str) -> bytes:
    data = struct.pack(">I", len(name.encode())) + name.encode() + struct.pack(">I", len(queries))
    for query in queries:
        data += struct.pack(">I", len(query.encode())) + query.encode()
    return data


def option(number: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, number, len(data)) + data


def request(
    cmd: int,
    offset: int = 0,
    length: int = 0,
    *,
    flags: int = 0,
    handle: int = 1,
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return REQUEST.pack(magic, flags, cmd, handle, offset, length)


@dataclass
class Chunk:
    flags: int
    type: int
    handle: int
    payload: bytes

    @property
    def error(self) -> tuple[int, str]:
        """(error, message) of an error chunk."""
        error, length = struct.unpack_from(">IH", self.payload)
        return error, self.payload[6 : 6 + length].decode()


class RawClient:
    """A plain socket speaking NBD by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"end of stream after {len(data)} of {size} bytes")
            data += chunk
        return data

    def greeting(self) -> tuple[int, int, int]:
        return struct.unpack(">QQH", self.recv_exactly(18))

    def start(self, flags: int = 3) -> None:
        """Greeting and client flags (default: fixed newstyle, no zeroes)."""
        self.greeting()
        self.sock.sendall(struct.pack(">I", flags))

    def send_option(self, number: int, data: bytes = b"") -> None:
        self.sock.sendall(option(number, data))

    def option_reply(self) -> tuple[int, int, bytes]:
        """(option, reply type, payload) of the next option reply."""
        magic, number, reply, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == OPTION_REPLY_MAGIC
        return number, reply, self.recv_exactly(length)

    def option_replies(self, number: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; (reply type, payload) of each reply up to the final one."""
        self.send_option(number, data)
        replies = []
        while True:
            echoed, reply, payload = self.option_reply()
            assert echoed == number
            replies.append((reply, payload))
            if reply not in (REP_SERVER, REP_INFO, REP_META_CONTEXT):
                return replies

    def set_meta(self, export: str, *queries: str) -> dict[str, int]:
        """NBD_OPT_SET_META_CONTEXT; the contexts selected, name -> id."""
        replies = self.option_replies(OPT_SET_META_CONTEXT, meta_data(export, *queries))
        assert replies[-1][0] == REP_ACK, replies[-1]
        return {p[4:].decode(): struct.unpack(">I", p[:4])[0] for _, p in replies[:-1]}

    def go(
        self, export: str = "vol", *, structured: bool = False, contexts: tuple[str, ...] = ()
    ) -> dict[str, int]:
        """Greeting, client flags, [STRUCTURED_REPLY, SET_META_CONTEXT,] NBD_OPT_GO: leaves
        the connection in transmission. Returns the selected contexts, name -> id."""
        self.start()
        selected = {}
        if structured:
            assert self.option_replies(OPT_STRUCTURED_REPLY) == [(REP_ACK, b"")]
        if contexts:
            selected = self.set_meta(export, *contexts)
        replies = self.option_replies(OPT_GO, info_data(export))
        assert replies[-1][0] == REP_ACK, f"NBD_OPT_GO failed: {replies[-1]}"
        return selected

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        handle: int = 1,
        magic: int = REQUEST_MAGIC,
        payload: bytes = b"",
    ) -> None:
        header = request(cmd, offset, length, flags=flags, handle=handle, magic=magic)
        self.sock.sendall(header + payload)

    def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data) of a simple reply; data only if it succeeded."""
        magic, error, handle = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == SIMPLE_MAGIC, f"not a simple reply: {magic:#x}"
        return error, handle, b"" if error else self.recv_exactly(data_length)

    def chunk(self) -> Chunk:
        magic, flags, kind, handle, length = struct.unpack(">IHHQI", self.recv_exactly(20))
        assert magic == STRUCTURED_MAGIC, f"not a structured reply: {magic:#x}"
        return Chunk(flags, kind, handle, self.recv_exactly(length))

    def chunks(self) -> list[Chunk]:
        """The chunks of one structured reply, up to the one flagged DONE."""
        chunks = [self.chunk()]
        while not chunks[-1].flags & REPLY_FLAG_DONE:
            chunks.append(self.chunk())
            assert chunks[-1].handle == chunks[0].handle
        return chunks

    def assert_closed(self) -> None:
        """The server ended the connection cleanly: end of stream, no reset."""
        assert self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


# Parsing a whole server output (the fuzz harness).


class Malformed(AssertionError):
    """The server's output does not parse: a protocol bug."""


@dataclass
class Cursor:
    data: bytes
    pos: int = 0
    notes: list[str] = field(default_factory=list)

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int, what: str) -> bytes:
        if self.left() < size:
            raise Malformed(f"{what}: {self.left()} bytes left, {size} needed at {self.pos}")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def unpack(self, layout: str, what: str) -> tuple[int, ...]:
        return struct.unpack(layout, self.take(struct.calcsize(layout), what))

    def peek_u32(self) -> int | None:
        return struct.unpack_from(">I", self.data, self.pos)[0] if self.left() >= 4 else None
