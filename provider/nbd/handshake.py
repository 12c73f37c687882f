"""Option haggling (fixed newstyle): from the greeting to an export, or to the end.

States: GREETING → OPTIONS → TRANSMISSION (an export chosen by NBD_OPT_GO or
NBD_OPT_EXPORT_NAME) or CLOSED (NBD_OPT_ABORT). Options are a table keyed by option number
(`_OPTIONS`); one missing from it is answered NBD_REP_ERR_UNSUP and haggling goes on, as
are NBD_OPT_INFO / NBD_OPT_GO information types (`_INFOS`). An `OptionError` becomes an
error reply; a `Disconnect` (bad magic, unknown client flags, an option longer than
MAX_OPTION_LENGTH, a refused NBD_OPT_EXPORT_NAME) ends the connection. A client that did
not set NBD_FLAG_C_FIXED_NEWSTYLE may only send NBD_OPT_EXPORT_NAME.

Registry calls and `BlockDevice.close` may block: they run in worker threads. Once
NBD_OPT_GO or NBD_OPT_EXPORT_NAME has opened an export it is `self.device`, and the
connection closes it whatever happens next; NBD_OPT_INFO closes what it opened itself.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable

import trio

from ..api import BlockDevice, ExportRegistry
from ..errors import ShadowblkError
from .protocol import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    MAX_REQUEST_LENGTH,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPTION_HEADER,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    U32,
    Buffer,
    Disconnect,
    InfoRequest,
    OptionError,
    decode_client_flags,
    decode_info_request,
    decode_name,
    decode_option_header,
    encode_export_name_reply,
    encode_greeting,
    encode_info_block_size,
    encode_info_export,
    encode_info_string,
    encode_option_reply,
    encode_server,
    encode_string,
    wanted_infos,
)
from .transmission import Session, transmission_flags
from .wire import Wire

log = logging.getLogger(__name__)


class State(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Handshake:
    def __init__(self, wire: Wire, registry: ExportRegistry) -> None:
        self.wire = wire
        self.registry = registry
        self.session = Session()
        self.state = State.GREETING
        self.device: BlockDevice | None = None

    async def run(self) -> BlockDevice | None:
        """The export to serve, or None when the client ended the session."""
        await self.wire.send(encode_greeting())
        flags = decode_client_flags(await self.wire.receive_exactly(U32.size))
        self.session.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.session.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.state = State.OPTIONS
        while self.state is State.OPTIONS:
            option, data = await self._receive_option()
            await self._dispatch(option, data)
        return self.device

    async def _receive_option(self) -> tuple[int, Buffer]:
        header = await self.wire.receive_exactly(OPTION_HEADER.size)
        option, length = decode_option_header(header)
        data = await self.wire.receive_exactly(length)
        if option != OPT_EXPORT_NAME and not self.session.fixed_newstyle:
            raise Disconnect(f"option {option} from a client without fixed newstyle")
        return option, data

    async def _dispatch(self, option: int, data: Buffer) -> None:
        handler = _OPTIONS.get(option, Handshake._unsupported)
        try:
            await handler(self, option, data)
        except OptionError as exc:
            log.info("nbd conn %d: option %d refused: %s", self.wire.ident, option, exc)
            await self._reply(option, exc.reply, encode_string(exc.message))

    async def _reply(self, option: int, reply: int, payload: Buffer = b"") -> None:
        await self.wire.send(encode_option_reply(option, reply, payload))

    async def _open(self, name: str) -> BlockDevice:
        try:
            return await trio.to_thread.run_sync(self.registry.open_export, name)
        except ShadowblkError as exc:
            raise OptionError(REP_ERR_UNKNOWN, exc.message) from None

    def _enter_transmission(self, device: BlockDevice) -> None:
        """From here on the connection owns `device` and closes it when it ends."""
        self.device = device
        self.state = State.TRANSMISSION

    # Options.

    async def _unsupported(self, option: int, data: Buffer) -> None:
        raise OptionError(REP_ERR_UNSUP, f"option {option} is not supported")

    async def _abort(self, option: int, data: Buffer) -> None:
        self.state = State.CLOSED
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._reply(option, REP_ACK)

    async def _list(self, option: int, data: Buffer) -> None:
        if data:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        exports = await trio.to_thread.run_sync(self.registry.export_names)
        replies = [encode_option_reply(option, REP_SERVER, encode_server(*e)) for e in exports]
        replies.append(encode_option_reply(option, REP_ACK))
        await self.wire.send(b"".join(replies))

    async def _export_name(self, option: int, data: Buffer) -> None:
        try:
            device = await self._open(decode_name(data))
        except OptionError as exc:  # this option cannot be answered with an error
            raise Disconnect(f"NBD_OPT_EXPORT_NAME refused: {exc.message}") from None
        self._enter_transmission(device)
        tflags = transmission_flags(device, self.session)
        no_zeroes = self.session.no_zeroes
        await self.wire.send(encode_export_name_reply(device.size, tflags, no_zeroes=no_zeroes))

    async def _info_or_go(self, option: int, data: Buffer) -> None:
        request = decode_info_request(data)
        device = await self._open(request.name)
        if option == OPT_GO:
            self._enter_transmission(device)
            await self.wire.send(await self._info_replies(option, device, request))
            return
        try:
            replies = await self._info_replies(option, device, request)
        finally:
            await release_export(device)  # before the reply: the client may count on it
        await self.wire.send(replies)

    async def _info_replies(self, option: int, device: BlockDevice, request: InfoRequest) -> bytes:
        """NBD_REP_INFO for INFO_EXPORT and each known type asked for, then NBD_REP_ACK."""
        replies = []
        for info in wanted_infos(request.infos):
            builder = _INFOS.get(info)
            payload = await builder(self, device, request.name) if builder else None
            if payload is not None:
                replies.append(encode_option_reply(option, REP_INFO, payload))
        replies.append(encode_option_reply(option, REP_ACK))
        return b"".join(replies)

    # Information types; None: nothing to send.

    async def _info_export(self, device: BlockDevice, name: str) -> bytes | None:
        return encode_info_export(device.size, transmission_flags(device, self.session))

    async def _info_name(self, device: BlockDevice, name: str) -> bytes | None:
        return encode_info_string(INFO_NAME, name)

    async def _info_description(self, device: BlockDevice, name: str) -> bytes | None:
        exports = await trio.to_thread.run_sync(self.registry.export_names)
        description = dict(exports).get(name)
        return encode_info_string(INFO_DESCRIPTION, description) if description else None

    async def _info_block_size(self, device: BlockDevice, name: str) -> bytes | None:
        return encode_info_block_size(1, preferred_block_size(device), MAX_REQUEST_LENGTH)


def preferred_block_size(device: BlockDevice) -> int:
    """The engine's chunk size (writes of whole chunks need no read-modify-write)."""
    size = device.chunk_size
    if 512 <= size <= MAX_REQUEST_LENGTH and size & (size - 1) == 0:
        return size
    return 4096


async def release_export(device: BlockDevice) -> None:
    """Close an export (this unpins a snapshot), even while being cancelled."""
    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(device.close)
        except Exception:
            log.exception("nbd: closing export %s failed", device.name)


_OptionHandler = Callable[[Handshake, int, Buffer], Awaitable[None]]
_InfoBuilder = Callable[[Handshake, BlockDevice, str], Awaitable[bytes | None]]

_OPTIONS: dict[int, _OptionHandler] = {
    OPT_EXPORT_NAME: Handshake._export_name,
    OPT_ABORT: Handshake._abort,
    OPT_LIST: Handshake._list,
    OPT_INFO: Handshake._info_or_go,
    OPT_GO: Handshake._info_or_go,
}

_INFOS: dict[int, _InfoBuilder] = {
    INFO_EXPORT: Handshake._info_export,
    INFO_NAME: Handshake._info_name,
    INFO_DESCRIPTION: Handshake._info_description,
    INFO_BLOCK_SIZE: Handshake._info_block_size,
}
