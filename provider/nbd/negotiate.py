"""The options about one export: NBD_OPT_INFO, NBD_OPT_GO and the meta-context options.

A mixin of `Handshake` (handshake.py), which owns the state these methods change. Every
option here opens the export it names through the registry (in a worker thread): an
unknown export is NBD_REP_ERR_UNKNOWN. NBD_OPT_GO keeps the export (the connection then
owns it); the others close it before they reply, so a client that sees the reply may count
on the export being released.

INFO/GO always send NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (our maximum, 32 MiB, is
below the spec's default, so we say it even unasked), and NBD_INFO_NAME and
NBD_INFO_DESCRIPTION when asked. Block sizes: minimum 1, preferred the volume's chunk size
(at least 4096), maximum 32 MiB.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..api import BlockDevice, ExportRegistry
from ..errors import ShadowblkError
from .codec import (
    decode_info_request,
    decode_meta_request,
    encode_info_block_size,
    encode_info_export,
    encode_info_string,
    encode_meta_context,
    encode_option_reply,
    wanted_infos,
)
from .commands import transmission_flags
from .protocol import (
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    MAX_REQUEST_LENGTH,
    OPT_GO,
    OPT_SET_META_CONTEXT,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNKNOWN,
    REP_INFO,
    REP_META_CONTEXT,
    Buffer,
    InfoRequest,
    OptionError,
)
from .session import Session, available_contexts, match_queries, preferred_block_size
from .wire import Wire

log = logging.getLogger(__name__)


class ExportOptions:
    wire: Wire
    registry: ExportRegistry
    session: Session

    if TYPE_CHECKING:

        def _enter_transmission(self, device: BlockDevice, name: str) -> None: ...

    async def _open(self, name: str) -> BlockDevice:
        try:
            return await trio.to_thread.run_sync(self.registry.open_export, name)
        except ShadowblkError as exc:
            raise OptionError(REP_ERR_UNKNOWN, exc.message) from None

    async def _info_or_go(self, option: int, data: Buffer) -> None:
        request = decode_info_request(data)
        device = await self._open(request.name)
        if option == OPT_GO:
            self._enter_transmission(device, request.name)
            await self.wire.send(await self._info_replies(option, device, request))
            return
        try:
            replies = await self._info_replies(option, device, request)
        finally:
            await release_export(device)
        await self.wire.send(replies)

    async def _info_replies(self, option: int, device: BlockDevice, request: InfoRequest) -> bytes:
        """NBD_REP_INFO for INFO_EXPORT, INFO_BLOCK_SIZE and each known type asked for,
        then NBD_REP_ACK."""
        replies = []
        for info in wanted_infos((*request.infos, INFO_BLOCK_SIZE)):
            payload = await self._info(info, device, request.name)
            if payload is not None:
                replies.append(encode_option_reply(option, REP_INFO, payload))
        replies.append(encode_option_reply(option, REP_ACK))
        return b"".join(replies)

    async def _info(self, info: int, device: BlockDevice, name: str) -> bytes | None:
        """One information type's payload; None: nothing to send (unknown type)."""
        if info == INFO_EXPORT:
            return encode_info_export(device.size, transmission_flags(device, self.session))
        if info == INFO_NAME:
            return encode_info_string(INFO_NAME, name)
        if info == INFO_DESCRIPTION:
            exports = await trio.to_thread.run_sync(self.registry.export_names)
            description = dict(exports).get(name)
            return encode_info_string(INFO_DESCRIPTION, description) if description else None
        if info == INFO_BLOCK_SIZE:
            return encode_info_block_size(1, preferred_block_size(device), MAX_REQUEST_LENGTH)
        return None

    async def _meta_context(self, option: int, data: Buffer) -> None:
        """NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (see session.py)."""
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self.session.clear_contexts()  # even if this option fails
            if not self.session.structured_replies:
                raise OptionError(REP_ERR_INVALID, "negotiate structured replies first")
        request = decode_meta_request(data)
        device = await self._open(request.name)
        try:
            available = await trio.to_thread.run_sync(available_contexts, device)
        except ShadowblkError as exc:
            raise OptionError(REP_ERR_UNKNOWN, exc.message) from None
        finally:
            await release_export(device)
        names = match_queries(request.queries, available, listing=not setting)
        if setting:
            chosen = list(self.session.select_contexts(request.name, names).items())
        else:
            chosen = [(0, name) for name in names]  # the spec: ids of a listing are 0
        replies = [
            encode_option_reply(option, REP_META_CONTEXT, encode_meta_context(*context))
            for context in chosen
        ]
        replies.append(encode_option_reply(option, REP_ACK))
        await self.wire.send(b"".join(replies))


async def release_export(device: BlockDevice) -> None:
    """Close an export (this unpins a snapshot), even while being cancelled."""
    with trio.CancelScope(shield=True):
        try:
            await trio.to_thread.run_sync(device.close)
        except Exception:
            log.exception("nbd: closing export %s failed", device.name)
