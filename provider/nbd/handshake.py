"""Option haggling (fixed newstyle): from the greeting to an export, or to the end.

States: GREETING → OPTIONS → TRANSMISSION (an export chosen by NBD_OPT_GO or
NBD_OPT_EXPORT_NAME) or CLOSED (NBD_OPT_ABORT). Options are a table keyed by option number
(`_OPTIONS`); one missing from it is answered NBD_REP_ERR_UNSUP and haggling goes on, as
are unknown NBD_OPT_INFO / NBD_OPT_GO information types. An `OptionError` becomes an error
reply; a `Disconnect` (bad magic, unknown client flags, an option longer than
MAX_OPTION_LENGTH, a refused NBD_OPT_EXPORT_NAME, a failed TLS handshake) ends the
connection. A client that did not set NBD_FLAG_C_FIXED_NEWSTYLE may only send
NBD_OPT_EXPORT_NAME.

TLS (FORCEDTLS mode, on a listener given an SSL context): until NBD_OPT_STARTTLS succeeds,
every option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is answered NBD_REP_ERR_TLS_REQD, and
NBD_OPT_EXPORT_NAME ends the connection. After the ACK the stream is upgraded in place
(`Wire.start_tls`) and the negotiation state is reset. Without a context (NOTLS mode, the
Unix socket) NBD_OPT_STARTTLS is NBD_REP_ERR_POLICY.

The options about exports (INFO, GO, the meta contexts) are in negotiate.py. Registry calls
and `BlockDevice.close` may block: they run in worker threads. Once NBD_OPT_GO or
NBD_OPT_EXPORT_NAME has opened an export it is `self.device`, and the connection closes it
whatever happens next; every other option closes what it opened itself before replying.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import ssl
from collections.abc import Awaitable, Callable

import trio

from ..api import BlockDevice, ExportRegistry
from .codec import (
    decode_client_flags,
    decode_name,
    decode_option_header,
    encode_export_name_reply,
    encode_greeting,
    encode_option_reply,
    encode_server,
    encode_string,
)
from .commands import transmission_flags
from .negotiate import ExportOptions
from .protocol import (
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_UNSUP,
    REP_SERVER,
    U32,
    Buffer,
    Disconnect,
    OptionError,
)
from .session import Session
from .wire import Wire

log = logging.getLogger(__name__)

_ALLOWED_BEFORE_TLS = (OPT_STARTTLS, OPT_ABORT)


class State(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class Handshake(ExportOptions):
    def __init__(
        self, wire: Wire, registry: ExportRegistry, tls: ssl.SSLContext | None = None
    ) -> None:
        self.wire = wire
        self.registry = registry
        self.session = Session(tls_context=tls)
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
            if self._tls_pending() and option not in _ALLOWED_BEFORE_TLS:
                if option == OPT_EXPORT_NAME:
                    raise Disconnect("NBD_OPT_EXPORT_NAME before TLS on a TLS listener")
                raise OptionError(REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            await handler(self, option, data)
        except OptionError as exc:
            log.info("nbd conn %d: option %d refused: %s", self.wire.ident, option, exc)
            await self._reply(option, exc.reply, encode_string(exc.message))

    def _tls_pending(self) -> bool:
        return self.session.tls_context is not None and not self.wire.tls

    async def _reply(self, option: int, reply: int, payload: Buffer = b"") -> None:
        await self.wire.send(encode_option_reply(option, reply, payload))

    def _enter_transmission(self, device: BlockDevice, name: str) -> None:
        """From here on the connection owns `device` and closes it when it ends."""
        self.device = device
        self.session.enter_export(name)
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

    async def _starttls(self, option: int, data: Buffer) -> None:
        context = self.session.tls_context
        if data:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if context is None:
            raise OptionError(REP_ERR_POLICY, "TLS is not offered on this listener")
        if self.wire.tls:
            raise OptionError(REP_ERR_INVALID, "TLS is already active")
        await self._reply(option, REP_ACK)
        await self.wire.start_tls(context)
        self.session.reset_after_starttls()
        log.debug("nbd conn %d: TLS started", self.wire.ident)

    async def _structured_reply(self, option: int, data: Buffer) -> None:
        if data:
            raise OptionError(REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        self.session.structured_replies = True
        await self._reply(option, REP_ACK)

    async def _export_name(self, option: int, data: Buffer) -> None:
        try:
            name = decode_name(data)
            device = await self._open(name)
        except OptionError as exc:  # this option cannot be answered with an error
            raise Disconnect(f"NBD_OPT_EXPORT_NAME refused: {exc.message}") from None
        self._enter_transmission(device, name)
        tflags = transmission_flags(device, self.session)
        no_zeroes = self.session.no_zeroes
        await self.wire.send(encode_export_name_reply(device.size, tflags, no_zeroes=no_zeroes))


_OptionHandler = Callable[[Handshake, int, Buffer], Awaitable[None]]

_OPTIONS: dict[int, _OptionHandler] = {
    OPT_EXPORT_NAME: Handshake._export_name,
    OPT_ABORT: Handshake._abort,
    OPT_LIST: Handshake._list,
    OPT_STARTTLS: Handshake._starttls,
    OPT_INFO: Handshake._info_or_go,
    OPT_GO: Handshake._info_or_go,
    OPT_STRUCTURED_REPLY: Handshake._structured_reply,
    OPT_LIST_META_CONTEXT: Handshake._meta_context,
    OPT_SET_META_CONTEXT: Handshake._meta_context,
}
