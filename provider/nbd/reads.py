"""READ and BLOCK_STATUS: the commands that describe the export (commands.py has the table).

A structured READ of at least HOLE_SCAN_MIN bytes asks `BlockDevice.extents` where the range
reads as zeroes and answers those runs with OFFSET_HOLE chunks, the rest with OFFSET_DATA
chunks; under DF (or when shorter, or when the look-up fails) it is one OFFSET_DATA chunk.
Every engine call of a read is made before anything is sent, so an error is a lone error
chunk. BLOCK_STATUS answers one chunk per selected context, computed in a worker thread;
REQ_ONE keeps the first descriptor; descriptors never go past the requested length.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

from ..api import EXTENT_ZERO, BlockDevice
from .codec import (
    encode_block_status,
    encode_data_header,
    encode_hole,
    encode_none,
    encode_simple_reply,
)
from .protocol import (
    CMD_FLAG_DF,
    CMD_FLAG_REQ_ONE,
    CMD_READ,
    CONTEXT_BASE_ALLOCATION,
    MAX_EXTENTS,
    MAX_REQUEST_LENGTH,
    NBD_EINVAL,
    NBD_EIO,
    QEMU_DIRTY_BITMAP,
    REQUEST,
    REQUEST_MAGIC,
    Buffer,
    Request,
    RequestError,
)

if TYPE_CHECKING:
    from .transmission import Transmission

HOLE_SCAN_MIN = 64 * 1024  # shorter structured reads are one data chunk, with no look-up


def check(t: Transmission, request: Request, *, past_end: int, limit: int | None = None) -> None:
    """The request's length against `limit` (EINVAL), its end against the export's size
    (`past_end`)."""
    if limit is not None and request.length > limit:
        raise RequestError(NBD_EINVAL, f"requests are limited to {limit} bytes")
    if request.end > t.device.size:
        raise RequestError(past_end, f"past the end of the export ({t.device.size} bytes)")


# READ


async def read(t: Transmission, request: Request, payload: Buffer) -> None:
    check(t, request, past_end=NBD_EINVAL, limit=MAX_REQUEST_LENGTH)
    if t.session.structured_replies:
        await t.reply(request, *_read_chunks(t, request))
        return
    data = _pread(t, request, request.offset, request.length) if request.length else b""
    await t.reply(request, encode_simple_reply(0, request.handle), data)


def serve_buffered_reads(t: Transmission) -> bool:
    """The fast path of a client that pipelines small reads: serve the plain READs already
    received (no flags, shorter than HOLE_SCAN_MIN, in range), inline, with no await and
    none of the per-request coroutines, their replies (data or error) queued on the wire.
    Stops at the first other request (the general path takes it, so requests are still
    served in order) or when the reply queue is full. True: the queue wants a flush."""
    wire, device = t.wire, t.device
    buffer, size, structured = wire.buffered(), device.size, t.session.structured_replies
    unpack, pread, queue = REQUEST.unpack_from, device.pread, wire.queue_nowait
    used, end = 0, len(buffer) - REQUEST.size  # requests are consumed at once, at the end
    try:
        while used <= end:
            magic, flags, kind, handle, offset, length = unpack(buffer, used)
            if kind != CMD_READ or flags or magic != REQUEST_MAGIC:
                break
            if not 0 < length < HOLE_SCAN_MIN or offset + length > size:
                break
            used += REQUEST.size
            try:
                data = pread(offset, length)
            except Exception as exc:
                request = Request(magic, flags, kind, handle, offset, length)
                if not t.reply_error_nowait(request, exc):
                    break
                continue
            if len(data) != length:
                request = Request(magic, flags, kind, handle, offset, length)
                t.log_failure(request, f"pread returned {len(data)} of {length} bytes")
                if not t.reply_error_nowait(request, RequestError(NBD_EIO, "short read")):
                    break
                continue
            if structured:
                header = encode_data_header(handle, offset, length, done=True)
            else:
                header = encode_simple_reply(0, handle)
            if not queue(header, data):
                break
    finally:
        wire.consume(used)
        t.counters["requests_served"] += used // REQUEST.size
    return wire.queue_full()


def _read_chunks(t: Transmission, request: Request) -> list[Buffer]:
    """Structured reply parts: OFFSET_HOLE for runs that read as zeroes, OFFSET_DATA for
    the rest; one OFFSET_DATA chunk under DF. Every engine call is made before anything is
    sent, so an error is a lone error chunk."""
    handle = request.handle
    if request.length == 0:
        return [encode_none(handle)]
    segments = [(request.offset, request.length, False)]
    if not request.flags & CMD_FLAG_DF and request.length >= HOLE_SCAN_MIN:
        segments = _segments(t, request)
    parts: list[Buffer] = []
    for index, (offset, size, hole) in enumerate(segments):
        done = index == len(segments) - 1
        if hole:
            parts.append(encode_hole(handle, offset, size, done=done))
        else:
            parts += [encode_data_header(handle, offset, size, done=done)]
            parts.append(_pread(t, request, offset, size))
    return parts


def _segments(t: Transmission, request: Request) -> list[tuple[int, int, bool]]:
    """(offset, size, reads as zeroes) runs covering the request, neighbours merged."""
    try:
        runs = clip_extents(t.device.extents(request.offset, request.length), request.length)
    except Exception as exc:  # holes are an optimisation: a failing look-up is a plain read
        t.log_failure(request, "extents failed; read as data", exc)
        return [(request.offset, request.length, False)]
    segments: list[tuple[int, int, bool]] = []
    offset = request.offset
    for size, flags in [*runs, (request.end - request.offset - sum(s for s, _ in runs), 0)]:
        hole = bool(flags & EXTENT_ZERO)
        if size and segments and segments[-1][2] == hole:
            start, previous, _ = segments[-1]
            segments[-1] = (start, previous + size, hole)
        elif size:
            segments.append((offset, size, hole))
        offset += size
    return segments


def _pread(t: Transmission, request: Request, offset: int, length: int) -> bytes | bytearray:
    data = t.engine(request, t.device.pread, offset, length)
    if len(data) != length:
        t.log_failure(request, f"pread returned {len(data)} of {length} bytes")
        raise RequestError(NBD_EIO, "short read")
    return data


def clip_extents(runs: Sequence[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """The engine's (length, flags) runs, checked, cut to `length` bytes, neighbours with
    equal flags merged; at least one run. ValueError: the engine broke its contract."""
    clipped: list[tuple[int, int]] = []
    total = 0
    for size, flags in runs:
        if size <= 0 or not 0 <= flags < 2**32:
            raise ValueError(f"the engine returned an invalid extent {(size, flags)}")
        size = min(size, length - total)
        if clipped and clipped[-1][1] == flags:
            clipped[-1] = (clipped[-1][0] + size, flags)
        else:
            clipped.append((size, flags))
        total += size
        if total >= length:
            break
    if not clipped:
        raise ValueError("the engine returned no extent")
    return clipped


# BLOCK_STATUS


async def block_status(t: Transmission, request: Request, payload: Buffer) -> None:
    if not t.session.contexts:
        raise RequestError(NBD_EINVAL, "no meta context was negotiated for this export")
    if not request.length:
        raise RequestError(NBD_EINVAL, "block status of an empty range")
    check(t, request, past_end=NBD_EINVAL)
    contexts = list(t.session.contexts.items())
    await t.start_blocking(request, partial(_status_chunks, t.device, request, contexts))


def _status_chunks(
    device: BlockDevice, request: Request, contexts: list[tuple[int, str]]
) -> list[bytes]:
    """One BLOCK_STATUS chunk per context (in a worker thread)."""
    chunks = []
    for index, (context_id, name) in enumerate(contexts):
        if name == CONTEXT_BASE_ALLOCATION:
            runs = device.extents(request.offset, request.length)
        else:
            since = name.removeprefix(QEMU_DIRTY_BITMAP)
            runs = device.dirty_extents(since, request.offset, request.length)
        runs = clip_extents(runs, request.length)
        runs = runs[:1] if request.flags & CMD_FLAG_REQ_ONE else runs[:MAX_EXTENTS]
        done = index == len(contexts) - 1
        chunks.append(encode_block_status(request.handle, context_id, runs, done=done))
    return chunks
