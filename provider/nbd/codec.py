"""Encoders and decoders of NBD messages (layouts in protocol.py). No I/O, no state."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from .protocol import (
    CHUNK_HEADER,
    DATA_CHUNK_HEADER,
    ERROR_PAYLOAD,
    EXPORT_NAME_PADDING,
    EXPORT_NAME_REPLY,
    EXTENT,
    GREETING,
    HOLE_CHUNK,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_BLOCK_SIZE_LAYOUT,
    INFO_EXPORT,
    INFO_EXPORT_LAYOUT,
    KNOWN_CLIENT_FLAGS,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    REQUEST,
    REQUEST_MAGIC,
    SERVER_HANDSHAKE_FLAGS,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    Buffer,
    Disconnect,
    InfoRequest,
    MetaRequest,
    OptionError,
    Request,
)


def encode_string(text: str) -> bytes:
    """UTF-8, cut to MAX_STRING bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode(errors="ignore").encode()


def decode_string(raw: Buffer, what: str) -> str:
    """A protocol string: UTF-8, at most MAX_STRING bytes, no NUL."""
    if len(raw) > MAX_STRING:
        raise OptionError(REP_ERR_TOO_BIG, f"{what} longer than {MAX_STRING} bytes")
    try:
        text = bytes(raw).decode()
    except UnicodeDecodeError:
        raise OptionError(REP_ERR_INVALID, f"{what} is not UTF-8") from None
    if "\0" in text:
        raise OptionError(REP_ERR_INVALID, f"{what} contains NUL")
    return text


def decode_name(raw: Buffer) -> str:
    return decode_string(raw, "export name")


# Handshake.


def encode_greeting() -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def decode_client_flags(data: Buffer) -> int:
    (flags,) = U32.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise Disconnect(f"unknown client flags {flags:#x}")
    return int(flags)


def decode_option_header(data: Buffer) -> tuple[int, int]:
    """(option, length of its data) from the 16-byte option header."""
    magic, option, length = OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise Disconnect(f"bad option magic {magic:#x}")
    if length > MAX_OPTION_LENGTH:
        raise Disconnect(f"option {option} declares {length} bytes of data")
    return option, length


def encode_option_reply(option: int, reply: int, payload: Buffer = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def encode_server(name: str, description: str) -> bytes:
    """Payload of NBD_REP_SERVER: the name, then a description for humans."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw + encode_string(description)


def encode_export_name_reply(size: int, tflags: int, *, no_zeroes: bool) -> bytes:
    padding = b"" if no_zeroes else EXPORT_NAME_PADDING
    return EXPORT_NAME_REPLY.pack(size, tflags) + padding


class _Reader:
    """Walks option data; any overrun is NBD_REP_ERR_INVALID."""

    def __init__(self, data: Buffer) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, size: int, what: str) -> memoryview:
        if self.pos + size > len(self.data):
            raise OptionError(REP_ERR_INVALID, f"{what} overruns the option")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def u16(self, what: str) -> int:
        return int(U16.unpack(self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(U32.unpack(self.take(4, what))[0])

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionError(REP_ERR_INVALID, "trailing bytes after the option data")


def decode_info_request(data: Buffer) -> InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, count info types."""
    reader = _Reader(data)
    name = reader.take(reader.u32("export name length"), "export name")
    count = reader.u16("information request count")
    infos = struct.unpack(f">{count}H", reader.take(2 * count, "information requests"))
    reader.end()
    return InfoRequest(decode_name(name), infos)


def decode_meta_request(data: Buffer) -> MetaRequest:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: export name, then counted query strings.
    The layout is checked first (NBD_REP_ERR_INVALID), then each string in order."""
    reader = _Reader(data)
    name = reader.take(reader.u32("export name length"), "export name")
    count = reader.u32("query count")
    raw_queries = []
    for _ in range(count):  # each query takes at least 4 bytes: bounded by the data
        raw_queries.append(reader.take(reader.u32("query length"), "query"))
    reader.end()
    export = decode_name(name)
    return MetaRequest(export, tuple(decode_string(q, "meta context query") for q in raw_queries))


def encode_info_export(size: int, tflags: int) -> bytes:
    return INFO_EXPORT_LAYOUT.pack(INFO_EXPORT, size, tflags)


def encode_info_string(info: int, text: str) -> bytes:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return U16.pack(info) + encode_string(text)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_LAYOUT.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


def encode_meta_context(context_id: int, name: str) -> bytes:
    """Payload of NBD_REP_META_CONTEXT."""
    return U32.pack(context_id) + name.encode()


def wanted_infos(requested: Iterable[int]) -> list[int]:
    """INFO_EXPORT first (always sent), then each other requested type once, in order."""
    wanted = [INFO_EXPORT]
    for info in requested:
        if info not in wanted:
            wanted.append(info)
    return wanted


# Transmission.


def decode_request(data: Buffer) -> Request:
    request = Request._make(REQUEST.unpack(data))
    if request.magic != REQUEST_MAGIC:
        raise Disconnect(f"bad request magic {request.magic:#x}")
    return request


def encode_simple_reply(error: int, handle: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_data_header(handle: int, offset: int, size: int, *, done: bool) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_DATA up to its data: send `size` bytes of data after it."""
    flags = REPLY_FLAG_DONE if done else 0
    magic = STRUCTURED_REPLY_MAGIC
    return DATA_CHUNK_HEADER.pack(magic, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + size, offset)


def encode_hole(handle: int, offset: int, size: int, *, done: bool) -> bytes:
    flags = REPLY_FLAG_DONE if done else 0
    magic = STRUCTURED_REPLY_MAGIC
    return HOLE_CHUNK.pack(magic, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, offset, size)


def encode_none(handle: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


def encode_error_chunk(handle: int, error: int, message: str) -> bytes:
    """NBD_REPLY_TYPE_ERROR, the final chunk of its reply."""
    text = encode_string(message)
    payload = ERROR_PAYLOAD.pack(error, len(text)) + text
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len(payload)
    )
    return header + payload


def encode_block_status(
    handle: int, context_id: int, extents: Sequence[tuple[int, int]], *, done: bool
) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS: one context's (length, flags) descriptors."""
    payload = bytearray(U32.pack(context_id))
    for extent in extents:
        payload += EXTENT.pack(*extent)
    flags = REPLY_FLAG_DONE if done else 0
    header = CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_BLOCK_STATUS, handle, len(payload)
    )
    return header + payload
