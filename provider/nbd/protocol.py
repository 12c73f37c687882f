"""The NBD wire format: constants, struct layouts, encoders and decoders. No I/O here.

Numbers and layouts follow the normative spec, NetworkBlockDevice/nbd `doc/proto.md`. All
integers are big-endian. Decoders raise `Disconnect` when the peer broke a MUST (the server
then drops the connection) and `OptionError` when an option deserves an error reply
(negotiation goes on). Constants for features that are not served yet (structured replies,
meta contexts, TRIM, WRITE_ZEROES, CACHE, TLS) are listed so later code finds them here.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from typing import NamedTuple

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option request
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # issue 3

# Handshake flags (server, 16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# Transmission flags (16 bits), sent with the export's size.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_CACHE = 1 << 10
TFLAG_SEND_FAST_ZERO = 1 << 11

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# Option reply types; errors have bit 31 set.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_PLATFORM = 2**31 + 4
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7
REP_ERR_BLOCK_SIZE_REQD = 2**31 + 8
REP_ERR_TOO_BIG = 2**31 + 9

# Information types of NBD_OPT_INFO / NBD_OPT_GO.
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Error values of the transmission phase: NBD's own numbers, not the host's errno.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Limits.
MAX_STRING = 4096  # export names, descriptions, messages
MAX_OPTION_LENGTH = 64 * 1024  # longer options are a denial of service: hard disconnect
MAX_REQUEST_LENGTH = 32 * 1024 * 1024  # largest read or write served
ABSURD_REQUEST_LENGTH = 64 * 1024 * 1024  # a write payload above this: hard disconnect
EXPORT_NAME_PADDING = bytes(124)  # after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES

# Struct layouts.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT_LAYOUT = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE_LAYOUT = struct.Struct(">HIII")  # type, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle

Buffer = bytes | bytearray


class Disconnect(Exception):
    """End the connection now (a hard disconnect): the peer broke the protocol, or the
    server cannot answer (an export refused to NBD_OPT_EXPORT_NAME)."""


class OptionError(Exception):
    """An option that gets an error reply (`reply` is a REP_ERR_*); negotiation goes on."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class Request(NamedTuple):
    magic: int
    flags: int
    type: int
    handle: int
    offset: int
    length: int


class InfoRequest(NamedTuple):
    name: str
    infos: tuple[int, ...]


def encode_string(text: str) -> bytes:
    """UTF-8, cut to MAX_STRING bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode(errors="ignore").encode()


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


def decode_name(raw: Buffer) -> str:
    """An export name: UTF-8, at most MAX_STRING bytes, no NUL."""
    if len(raw) > MAX_STRING:
        raise OptionError(REP_ERR_TOO_BIG, f"export name longer than {MAX_STRING} bytes")
    try:
        name = bytes(raw).decode()
    except UnicodeDecodeError:
        raise OptionError(REP_ERR_INVALID, "export name is not UTF-8") from None
    if "\0" in name:
        raise OptionError(REP_ERR_INVALID, "export name contains NUL")
    return name


def decode_info_request(data: Buffer) -> InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, count info types."""
    if len(data) < 6:
        raise OptionError(REP_ERR_INVALID, "option data too short")
    (name_len,) = U32.unpack_from(data, 0)
    if 4 + name_len + 2 > len(data):
        raise OptionError(REP_ERR_INVALID, "export name overruns the option")
    (count,) = U16.unpack_from(data, 4 + name_len)
    if len(data) != 4 + name_len + 2 + 2 * count:
        raise OptionError(REP_ERR_INVALID, "information requests do not match the length")
    infos = struct.unpack_from(f">{count}H", data, 6 + name_len)
    return InfoRequest(decode_name(data[4 : 4 + name_len]), infos)


def encode_info_export(size: int, tflags: int) -> bytes:
    return INFO_EXPORT_LAYOUT.pack(INFO_EXPORT, size, tflags)


def encode_info_string(info: int, text: str) -> bytes:
    """NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return U16.pack(info) + encode_string(text)


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_LAYOUT.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


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


_NBD_ERRNO = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(host_errno: int | None) -> int:
    """The NBD error value for a host errno; anything without an NBD equivalent is EIO."""
    return _NBD_ERRNO.get(host_errno or 0, NBD_EIO)
