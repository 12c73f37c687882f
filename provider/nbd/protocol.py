"""The NBD wire format: constants, struct layouts, message types and errors. No I/O here.

Numbers and layouts follow the normative spec, NetworkBlockDevice/nbd `doc/proto.md`, and
the `qemu:` meta-context namespace of qemu's `docs/interop/nbd.rst`. All integers are
big-endian. Encoders and decoders live in codec.py. A decoder raises `Disconnect` when the
peer broke a MUST (the server then drops the connection) and `OptionError` when an option
deserves an error reply (negotiation goes on).
"""

from __future__ import annotations

import errno
import struct
from typing import NamedTuple

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option request
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

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
OPT_EXTENDED_HEADERS = 11  # not served: answered NBD_REP_ERR_UNSUP

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

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1
REPLY_TYPE_ERROR_OFFSET = 2**15 + 2

# Meta contexts: the namespaces served and the flags of their extents.
CONTEXT_BASE_ALLOCATION = "base:allocation"
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"  # followed by a snapshot name, VOLUME@N
STATE_HOLE = 1 << 0  # base:allocation
STATE_ZERO = 1 << 1  # base:allocation
STATE_DIRTY = 1 << 0  # qemu:dirty-bitmap:*

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
MAX_STRING = 4096  # export names, descriptions, messages, context names
MAX_OPTION_LENGTH = 64 * 1024  # longer options are a denial of service: hard disconnect
MAX_REQUEST_LENGTH = 32 * 1024 * 1024  # largest read or write payload served
ABSURD_REQUEST_LENGTH = 64 * 1024 * 1024  # a write payload above this: hard disconnect
MAX_EXTENTS = 64 * 1024  # descriptors per BLOCK_STATUS chunk (the spec lets us send fewer)
EXPORT_NAME_PADDING = bytes(124)  # after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES

# Struct layouts.
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT_LAYOUT = struct.Struct(">HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE_LAYOUT = struct.Struct(">HIII")  # type, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")  # ... and the offset of OFFSET_DATA
HOLE_CHUNK = struct.Struct(">IHHQIQI")  # ... the offset and size of OFFSET_HOLE
ERROR_PAYLOAD = struct.Struct(">IH")  # error, message length (then the message)
EXTENT = struct.Struct(">II")  # length, status flags

Buffer = bytes | bytearray | memoryview


class Disconnect(Exception):
    """End the connection now (a hard disconnect): the peer broke the protocol, or the
    server cannot answer (an export refused to NBD_OPT_EXPORT_NAME)."""


class OptionError(Exception):
    """An option that gets an error reply (`reply` is a REP_ERR_*); negotiation goes on."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class RequestError(Exception):
    """A request answered with an NBD error (`error` is an NBD_E*); the connection goes on."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class Request(NamedTuple):
    magic: int
    flags: int
    type: int
    handle: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class InfoRequest(NamedTuple):
    name: str
    infos: tuple[int, ...]


class MetaRequest(NamedTuple):
    """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data."""

    name: str
    queries: tuple[str, ...]


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
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(host_errno: int | None) -> int:
    """The NBD error value for a host errno; anything without an NBD equivalent is EIO."""
    return _NBD_ERRNO.get(host_errno or 0, NBD_EIO)
