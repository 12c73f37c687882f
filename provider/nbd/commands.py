"""The commands of the transmission phase, and what an export advertises.

`COMMANDS` maps a command type to its handler, the command flags it accepts and a name;
`transmission_flags` says what an export offers. They must agree: every flag advertised is
served here, and a command or flag not in the table is NBD_EINVAL. FUA is accepted on every
command (the spec asks it); it flushes after TRIM, WRITE and WRITE_ZEROES and is ignored
elsewhere. DF is accepted on READ only once structured replies are negotiated.

Checks, in order (the spec's error values; docs/nbd.md has the table): the flags, then
read-only (EPERM for WRITE, TRIM, WRITE_ZEROES; a write's payload is always consumed
first), then the length limit (READ and WRITE: 32 MiB, EINVAL), then the range (past the
end: ENOSPC for WRITE and WRITE_ZEROES, EINVAL for the others). A zero-length request is
then answered with success and does nothing (BLOCK_STATUS: EINVAL, as it cannot describe
an empty range).

Handlers run in the connection's reader task (transmission.py); each answers its request,
inline or through `start_blocking`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from ..api import BlockDevice
from .protocol import (
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    MAX_REQUEST_LENGTH,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    TFLAG_CAN_MULTI_CONN,
    TFLAG_HAS_FLAGS,
    TFLAG_READ_ONLY,
    TFLAG_SEND_CACHE,
    TFLAG_SEND_DF,
    TFLAG_SEND_FAST_ZERO,
    TFLAG_SEND_FLUSH,
    TFLAG_SEND_FUA,
    TFLAG_SEND_TRIM,
    TFLAG_SEND_WRITE_ZEROES,
    Buffer,
    Request,
    RequestError,
)
from .reads import block_status, check, read
from .session import Session

if TYPE_CHECKING:
    from .transmission import Transmission


def transmission_flags(device: BlockDevice, session: Session) -> int:
    """What `device` offers on this session; `COMMANDS` serves every flag set here."""
    flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE
    flags |= TFLAG_CAN_MULTI_CONN  # the engine is shared: a flush covers every connection
    if device.readonly:
        flags |= TFLAG_READ_ONLY
    else:
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO
    if session.structured_replies:
        flags |= TFLAG_SEND_DF
    return flags


def handler_for(request: Request, session: Session) -> Handler:
    """The request's handler; NBD_EINVAL for an unknown command or a flag it does not take."""
    command = COMMANDS.get(request.type)
    if command is None:
        raise RequestError(NBD_EINVAL, f"unknown command {request.type}")
    accepted = command.flags
    if request.type == CMD_READ and not session.structured_replies:
        accepted &= ~CMD_FLAG_DF  # the spec: DF only once structured replies are on
    if request.flags & ~accepted:
        raise RequestError(NBD_EINVAL, f"flags {request.flags:#x} are not valid for {command.name}")
    return command.handler


def name_of(request: Request) -> str:
    command = COMMANDS.get(request.type)
    return command.name if command else f"command {request.type}"


def _check_writable(t: Transmission) -> None:
    if t.device.readonly:
        raise RequestError(NBD_EPERM, f"{t.device.name} is read-only")


# WRITE, TRIM, WRITE_ZEROES, FLUSH, CACHE


async def _write(t: Transmission, request: Request, payload: Buffer) -> None:
    _check_writable(t)
    check(t, request, past_end=NBD_ENOSPC, limit=MAX_REQUEST_LENGTH)
    if not request.length:
        await t.reply_ok(request)
        return
    applied = t.engine(request, t.device.write_nowait, request.offset, payload)
    fua = bool(request.flags & CMD_FLAG_FUA)
    if applied and not fua:
        await t.reply_ok(request)
    elif applied:
        await t.start_blocking(request, t.device.flush)
    else:
        retry = None
        if not fua:  # a held write waits in a task, then is applied inline: no thread
            retry = Retry(
                partial(t.device.wait_writable, request.offset, request.length),
                partial(t.device.write_nowait, request.offset, payload),
            )
        work = partial(_write_blocking, t.device, request, payload)
        await t.start_blocking(request, work, retry)


class Retry(NamedTuple):
    """A write `write_nowait` refused that may wait in its task instead of a worker thread
    (`Transmission.start_blocking`)."""

    wait: Callable[[Callable[[], None]], bool]  # the device's wait_writable, for its range
    apply: Callable[[], bool]  # its write_nowait


def _write_blocking(device: BlockDevice, request: Request, payload: Buffer) -> None:
    device.write(request.offset, payload)
    if request.flags & CMD_FLAG_FUA:
        device.flush()


async def _trim(t: Transmission, request: Request, payload: Buffer) -> None:
    _check_writable(t)
    check(t, request, past_end=NBD_EINVAL)
    await _zero(t, request, punch=True, fast=False)


async def _write_zeroes(t: Transmission, request: Request, payload: Buffer) -> None:
    _check_writable(t)
    check(t, request, past_end=NBD_ENOSPC)
    punch = not request.flags & CMD_FLAG_NO_HOLE
    await _zero(t, request, punch=punch, fast=bool(request.flags & CMD_FLAG_FAST_ZERO))


async def _zero(t: Transmission, request: Request, *, punch: bool, fast: bool) -> None:
    """Inline when `zero_nowait` can; FAST_ZERO always asks `zero(fast=True)` in a thread,
    as only it may refuse (NotSupported: chunks must be preserved first) without work."""
    if not request.length:
        await t.reply_ok(request)
        return
    fua = bool(request.flags & CMD_FLAG_FUA)
    done = not fast and t.engine(
        request, t.device.zero_nowait, request.offset, request.length, punch=punch
    )
    if done and not fua:
        await t.reply_ok(request)
    elif done:
        await t.start_blocking(request, t.device.flush)
    else:
        work = partial(_zero_blocking, t.device, request, punch, fast)
        await t.start_blocking(request, work)


def _zero_blocking(device: BlockDevice, request: Request, punch: bool, fast: bool) -> None:
    device.zero(request.offset, request.length, punch=punch, fast=fast)
    if request.flags & CMD_FLAG_FUA:
        device.flush()


async def _flush(t: Transmission, request: Request, payload: Buffer) -> None:
    if request.offset or request.length:
        raise RequestError(NBD_EINVAL, "a flush has offset and length 0")
    await t.start_blocking(request, t.device.flush)


async def _cache(t: Transmission, request: Request, payload: Buffer) -> None:
    check(t, request, past_end=NBD_EINVAL)
    if not request.length:
        await t.reply_ok(request)
        return
    await t.start_blocking(request, partial(t.device.cache, request.offset, request.length))


async def _disconnect(t: Transmission, request: Request, payload: Buffer) -> None:
    """No reply; `run` returns once the requests in flight are answered."""
    t.done = True


Handler = Callable[["Transmission", Request, Buffer], Awaitable[None]]


class Command(NamedTuple):
    handler: Handler
    flags: int  # the command flags it accepts
    name: str


COMMANDS: dict[int, Command] = {
    CMD_READ: Command(read, CMD_FLAG_FUA | CMD_FLAG_DF, "read"),
    CMD_WRITE: Command(_write, CMD_FLAG_FUA, "write"),
    CMD_DISC: Command(_disconnect, 0xFFFF, "disconnect"),
    CMD_FLUSH: Command(_flush, CMD_FLAG_FUA, "flush"),
    CMD_TRIM: Command(_trim, CMD_FLAG_FUA, "trim"),
    CMD_CACHE: Command(_cache, CMD_FLAG_FUA, "cache"),
    CMD_WRITE_ZEROES: Command(
        _write_zeroes, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, "write_zeroes"
    ),
    CMD_BLOCK_STATUS: Command(block_status, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, "block_status"),
}
