"""An atheris (libFuzzer) harness for the NBD server's parsers, run by hand: `make fuzz`, or
`.venv/bin/python tests/fuzz/atheris_nbd.py -runs=100000 build/fuzz/nbd`.

Design notes
------------
Each input is one connection, served in this process by `NBDServer.handle_stream` (the
entry point every listener uses) over a socketpair, against the fake registry of the
protocol tests. What the server answers is checked by the oracle of the hypothesis fuzzer
(tests/protocol/nbd_fuzz_handshake.py, nbd_fuzz_model.py): this file only turns fuzzer
bytes into client streams. The first byte picks the shape of the stream:
- 0: the rest, raw, as the client's whole handshake;
- 1: a handshake of framed options (magic and length right, numbers and data fuzzed);
- 2: NBD_OPT_GO (with structured replies and meta contexts or not), then requests built
  from the bytes the way test_nbd_fuzz.py builds them: writes that would succeed carry the
  bytes already there and valid TRIM/WRITE_ZEROES move into a zeroed region, so the
  exports never change and every read can be checked.
Before that, the raw bytes go straight into the decoders of codec.py.

A finding is any exception out of `TestOneInput`: a decoder raising anything but the
documented `OptionError`/`Disconnect`, an answer the oracle refuses (`Malformed`), a
connection that neither answers nor closes within CASE_TIMEOUT, an error logged by the
server (it logs one for a bug in a handler), an export left open, or changed contents.
Without atheris installed the module still imports (tests/fuzz/test_harnesses.py runs
`TestOneInput` on fixed inputs so that the harness cannot rot).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import fuzzmain
import trio

try:
    import atheris  # type: ignore[import-not-found]
except ImportError:  # the harness still runs under pytest, uninstrumented
    atheris = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))


def instrumented() -> contextlib.AbstractContextManager[Any]:
    """Coverage instrumentation of shadowblk's modules, imported within."""
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["shadowblk"])


with instrumented():
    from fake_registry import FakeRegistry
    from nbd_fuzz_handshake import check_handshake, parse_go_handshake
    from nbd_fuzz_model import BASE, EXPORTS, Export, Session, check_replies, outcome
    from rawclient import CMD_DISC, CMD_WRITE, IHAVEOPT, REQUEST_MAGIC, Cursor, request
    from test_nbd_fuzz import BITMAP, ZEROED, go_prefix, read_export, sanitize

    from shadowblk.provider.nbd import codec
    from shadowblk.provider.nbd.protocol import Disconnect, OptionError
    from shadowblk.provider.nbd.server import NBDServer

MiB = 1 << 20
CASE_TIMEOUT = 10.0  # seconds for one connection to end; a hang is a finding
CHECK_EVERY = 500  # cases between two full comparisons of the exports with the model
QUERY_SETS = [(), (BASE,), (BITMAP,), (BASE, BITMAP)]
SEEDS = [
    b"\x00" + struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 3, 0),
    b"\x01\x03" + bytes([7, 9]) + struct.pack(">I", 3) + b"vol" + bytes(6),
    b"\x02\x0f\x03" + bytes(15 * 4) + b"\x01",
]


class Bytes:
    """Reads fuzzer bytes as numbers; past the end everything is zero."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        piece = self.data[self.pos : self.pos + size]
        self.pos += size
        return piece

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "big")

    def rest(self) -> bytes:
        return self.take(len(self.data))


class Target:
    """The fake registry, the model of its exports, and the errors the server logged."""

    def __init__(self) -> None:
        self.registry = FakeRegistry()
        device = self.registry.open_export("vol")
        for offset, length in ZEROED:
            device.zero(offset, length, punch=True)
        device.close()
        self.exports = {
            name: Export(name, read_export(self.registry, name), b"") for name in EXPORTS
        }
        for model in self.exports.values():
            model.snapshot = self.exports["vol@1"].data
        self.errors: list[logging.LogRecord] = []
        self.cases = 0
        self.handler = logging.Handler(logging.ERROR)
        self.handler.emit = self.errors.append  # type: ignore[method-assign]
        logging.getLogger("shadowblk").addHandler(self.handler)

    def close(self) -> None:
        logging.getLogger("shadowblk").removeHandler(self.handler)

    def check(self) -> None:
        """After each case: nothing logged, every export closed; now and then, contents."""
        self.cases += 1
        if self.errors:
            record = self.errors.pop()
            raise AssertionError(f"the server logged an error: {record.getMessage()}")
        assert self.registry.open_devices == [], "an export was left open"
        if self.cases % CHECK_EVERY == 0:
            for name, model in self.exports.items():
                assert read_export(self.registry, name) == model.data, f"{name} was changed"


_target: Target | None = None


def target() -> Target:
    """The one target of this process, made at first use."""
    global _target
    if _target is None:
        _target = Target()
    return _target


def forget_target() -> None:
    """Drop the target (its log handler too): for tests that run the harness in-process."""
    global _target
    if _target is not None:
        _target.close()
        _target = None


# Feeding the decoders directly.

_FIXED = [("decode_client_flags", 4), ("decode_option_header", 16), ("decode_request", 28)]
_VARIABLE = ["decode_info_request", "decode_meta_request", "decode_name"]


def check_codec(data: bytes) -> None:
    """Only the documented protocol errors may come out of a decoder."""
    for name, size in _FIXED:
        with contextlib.suppress(OptionError, Disconnect):
            getattr(codec, name)(data[:size].ljust(size, b"\0"))
    for name in _VARIABLE:
        with contextlib.suppress(OptionError, Disconnect):
            getattr(codec, name)(data)


# One connection.


async def _converse(registry: FakeRegistry, stream: bytes) -> bytes:
    ours, theirs = trio.socket.socketpair()
    client, received = trio.SocketStream(ours), bytearray()
    with trio.fail_after(CASE_TIMEOUT):
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(NBDServer(registry).handle_stream, trio.SocketStream(theirs))
            nursery.start_soon(_send, client, stream)
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await client.receive_some(1 << 20):
                    received += chunk
    return bytes(received)


async def _send(client: trio.SocketStream, stream: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await client.send_all(stream)
        await client.send_eof()


def exchange(stream: bytes) -> bytes:
    """All the server sent for `stream` until it closed the connection."""
    return trio.run(_converse, target().registry, stream)


# Streams from fuzzer bytes.


def framed_options(data: Bytes) -> bytes:
    """Client flags, then options with the right magic and length: number and data fuzzed."""
    stream = struct.pack(">I", data.uint(1) % 4)
    while data.pos < len(data.data):
        number = data.uint(1)
        number = number % 12 if number < 0xF0 else data.uint(4)
        payload = data.take(data.uint(1))
        stream += struct.pack(">QII", IHAVEOPT, number, len(payload)) + payload
    return stream


def one_request(data: Bytes, session: Session) -> tuple[bytes, bool]:
    """A request (and payload) from the bytes; False once the stream must end."""
    shape, cmd, flags = data.uint(1), data.uint(1), data.uint(2)
    cmd = cmd % 8 if cmd < 0xF8 else data.uint(2)
    flags = flags if shape & 8 else flags & 0x1F
    offset = data.uint(8) if shape & 1 else data.uint(4) % (16 * MiB + 1)
    length = data.uint(4) if shape & 2 else data.uint(3) % (256 * 1024 + 1)
    offset, length = sanitize(session, cmd, flags, offset, length)
    magic = data.uint(4) if shape & 0x70 == 0x70 else REQUEST_MAGIC
    head = request(cmd, offset, length, flags=flags, handle=data.pos, magic=magic)
    if cmd != CMD_WRITE:
        return head, True
    if length > MiB:  # not sent in full: the last request, cut short
        return head + bytes(min(length, 4096)), False
    if 0 in outcome(session, flags, cmd, offset, length) and magic == REQUEST_MAGIC:
        return head + session.export.data[offset : offset + length], True
    return head + data.take(length).ljust(length, b"\xa5"), True


def request_stream(data: Bytes) -> tuple[Session, tuple[str, ...], bytes]:
    setup = data.uint(1)
    export = target().exports[EXPORTS[setup & 1]]
    structured = bool(setup & 2)
    queries = QUERY_SETS[(setup >> 2) & 3] if structured else ()
    session = Session(export, structured, dict(enumerate(queries, start=1)))
    stream, going = b"", True
    for _ in range(data.uint(1) % 8 + 1):
        piece, going = one_request(data, session)
        stream += piece
        if not going:
            break
    ending = data.uint(1) % 3
    if going and ending:
        stream += request(CMD_DISC, handle=2**64 - 1) if ending == 1 else data.rest()
    return session, queries, stream


def check_requests(data: Bytes) -> None:
    session, queries, stream = request_stream(data)
    output = exchange(go_prefix(session.export.name, session.structured, queries) + stream)
    cursor = Cursor(output)
    contexts = parse_go_handshake(cursor, session.structured, queries)
    assert sorted(contexts.values()) == sorted(queries)
    check_replies(output[cursor.pos :], Session(session.export, session.structured, contexts),
                  stream)  # fmt: skip


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    check_codec(data)
    if not data:
        return
    shape, rest = data[0] % 3, Bytes(data[1:])
    if shape == 2:
        check_requests(rest)
    else:
        stream = rest.rest() if shape == 0 else framed_options(rest)
        check_handshake(stream, exchange(stream))
    target().check()


def main() -> None:
    logging.getLogger("shadowblk").setLevel(logging.ERROR)  # quiet: errors are findings
    fuzzmain.run(atheris, SEEDS, TestOneInput)


if __name__ == "__main__":
    main()
