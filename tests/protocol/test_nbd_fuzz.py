"""Hypothesis-generated malformed handshakes and requests, over raw sockets, against the
server in this process.

Each case is one connection: the bytes are sent, the write side is shut, and everything the
server answers is read until it closes, within CASE_TIMEOUT (a hang fails the case). The
answer is parsed strictly and checked against the models in nbd_fuzz_model.py (requests)
and nbd_fuzz_handshake.py (options). Across the run: the server never logs an error
(malformed input is the client's fault), every connection is released, a canary connection
opened before the run still reads correctly after it, and the exports' contents are
unchanged: valid writes carry the bytes already there, valid zeroes land in a region zeroed
beforehand, rejected requests carry junk. (Two more zeroed islands give reads holes and
block status runs to report.)

SHADOWBLK_FUZZ_CASES (default 10000) is the number of cases against the fake registry,
half handshakes and half requests; the real engine gets a tenth of that. Generation is
derandomized: every run makes the same cases.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from fake_registry import FakeRegistry
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nbd_fuzz_handshake import check_handshake, parse_go_handshake
from nbd_fuzz_model import (
    BASE,
    CHUNK,
    EXPORTS,
    Export,
    Session,
    check_replies,
    outcome,
)
from rawclient import (
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    IHAVEOPT,
    REQUEST_MAGIC,
    Cursor,
    info_data,
    meta_data,
    option,
    request,
)

from shadowblk.provider.api import ExportRegistry

MiB = 1024 * 1024
CASES = int(os.environ.get("SHADOWBLK_FUZZ_CASES", "10000"))
CASE_TIMEOUT = 10.0  # seconds for one connection to end; a hang fails the case
ZERO_AT, ZERO_LEN = 8 * MiB, MiB  # zeroed before the run: valid TRIM/WRITE_ZEROES go here
ZEROED = [(2 * MiB, CHUNK), (ZERO_AT, ZERO_LEN), (12 * MiB + 2 * CHUNK, 3 * CHUNK)]
BITMAP = "qemu:dirty-bitmap:vol@1"
U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any], weight: int = 7) -> Any:
    """`usual` about `weight` times out of `weight + 1`: malformed input that is mostly
    well formed reaches deeper than noise."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda u: usual if u else odd)


def exchange(path: str, data: bytes) -> bytes:
    """Send `data`, shut the write side, return all the server sent until it closed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    received, view, sent = bytearray(), memoryview(data), 0
    deadline = time.monotonic() + CASE_TIMEOUT
    with sock, selectors.DefaultSelector() as selector:
        writing = bool(data)
        if not writing:
            sock.shutdown(socket.SHUT_WR)
        selector.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the server neither answered nor closed in {CASE_TIMEOUT} s")
            for _, events in selector.select(left):
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(1 << 20)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        return bytes(received)
                    received += chunk
                if events & selectors.EVENT_WRITE and writing:
                    try:
                        sent += sock.send(view[sent : sent + (1 << 20)])
                    except (BrokenPipeError, ConnectionResetError):
                        sent = len(data)  # the server closed: read what it said
                    if sent == len(data):
                        writing = False
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                        selector.modify(sock, selectors.EVENT_READ)


# Strategies: handshakes.

NAMES = mostly(st.sampled_from(["vol", "vol@1", "vol", "nope", "", "vol@99"]), st.text(max_size=8))
RAW_NAMES = mostly(NAMES.map(str.encode), st.binary(max_size=12) | st.just(b"v" * 4097), 5)
QUERIES = mostly(
    st.sampled_from([BASE, BITMAP, "base:", "qemu:", "qemu:dirty-bitmap:", "x-a:b", "base:x",
                     "qemu:dirty-bitmap:vol@9"]),
    st.sampled_from(["nocolon", ":x", ""]) | st.text(max_size=10),
)  # fmt: skip
OPTIONS = mostly(st.sampled_from([1, 2, 3, 3, 5, 6, 6, 7, 8, 8, 9, 9, 10, 10, 11, 0, 4]), U32)


@st.composite
def option_message(draw: st.DrawFn) -> bytes:
    number = draw(OPTIONS)
    if number in (6, 7):
        infos = draw(st.lists(st.sampled_from([0, 1, 2, 3]) | st.integers(0, 0xFFFF), max_size=5))
        data = info_data("", *infos)[4:]
        name = draw(RAW_NAMES)
        data = struct.pack(">I", len(name)) + name + data
    elif number in (9, 10):
        data = meta_data(draw(NAMES), *draw(st.lists(QUERIES, max_size=4)))
    elif number == 1:
        data = draw(RAW_NAMES)
    else:
        data = b""
    mangle = draw(st.sampled_from(["none"] * 12 + ["junk", "cut", "extend"]))
    if mangle == "junk":
        data = draw(st.binary(max_size=64))
    elif mangle == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif mangle == "extend":
        data += draw(st.binary(min_size=1, max_size=16))
    odd_lengths = st.sampled_from([0, 65536, 65537, 2**32 - 1]) | U32
    length = draw(mostly(st.just(len(data)), odd_lengths, 15))
    magic = draw(mostly(st.just(IHAVEOPT), U64, 15))
    return struct.pack(">QII", magic, number, length) + data


@st.composite
def handshake_stream(draw: st.DrawFn) -> bytes:
    flags = draw(mostly(st.sampled_from([1, 3, 3, 3, 0, 2]), U32, 15))
    stream = struct.pack(">I", flags) + (option(8) if draw(st.booleans()) else b"")
    stream += b"".join(draw(st.lists(option_message(), max_size=8)))
    if draw(st.integers(0, 5)) == 0:
        stream = stream[: draw(st.integers(0, len(stream)))]
    return stream + draw(mostly(st.just(b""), st.binary(max_size=24), 3))


# Strategies: requests.

NEAR_ZEROES = st.tuples(st.sampled_from(ZEROED), st.integers(-3 * CHUNK, 3 * CHUNK)).map(
    lambda z: max(0, z[0][0] + z[1]) if z[1] < 0 else z[0][0] + z[0][1] // 2 + z[1]
)
OFFSETS = mostly(
    st.sampled_from([0, 1, 511, 4096, CHUNK, 16 * MiB - CHUNK, 16 * MiB - 4096, 16 * MiB - 1,
                     16 * MiB])
    | st.integers(0, 16 * MiB)
    | st.integers(0, 256).map(lambda c: c * CHUNK)
    | NEAR_ZEROES,
    st.sampled_from([16 * MiB + 1, 2**63, 2**64 - 1]) | U64,
    4,
)  # fmt: skip
LENGTHS = mostly(
    st.integers(0, 256 * 1024) | st.sampled_from([0, 1, 512, 4096, 4097, CHUNK, 3 * CHUNK + 5]),
    st.sampled_from([MiB, 32 * MiB, 32 * MiB + 1, 64 * MiB + 1, 2**32 - 1]),
    4,
)
COMMANDS = mostly(st.sampled_from([0, 0, 1, 1, 2, 3, 4, 5, 6, 6, 7, 7, 7]), st.integers(8, 0xFFFF))
ANY_FLAGS = st.sampled_from([1, 2, 4, 8, 16, 32, 1 << 15]) | st.integers(0, 0xFFFF)
VALID_FLAGS = {
    0: [0, 0, 1, 4, 5],
    1: [0, 0, 1],
    3: [0, 1],
    4: [0, 0, 1],
    5: [0, 1],
    6: [0, 1, 2, 16, 17, 18, 19],
    7: [0, 0, 8, 9],
}


@st.composite
def one_request(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(cmd, flags, offset, length): mostly coherent, sometimes not."""
    cmd = draw(COMMANDS)
    flags = draw(mostly(st.sampled_from(VALID_FLAGS.get(cmd, [0])), ANY_FLAGS, 5))
    if cmd == 3:
        offset, length = draw(mostly(st.just((0, 0)), st.tuples(OFFSETS, LENGTHS), 5))
        return cmd, flags, offset, length
    offset = draw(OFFSETS)
    room = max(0, min(256 * 1024, 16 * MiB - offset))
    length = draw(mostly(st.integers(0, room), LENGTHS, 3))
    return cmd, flags, offset, length


def sanitize(session: Session, cmd: int, flags: int, offset: int, length: int) -> tuple:
    """Make a request that would change the export harmless: valid TRIM/WRITE_ZEROES move
    into the zeroed region. Returns (offset, length)."""
    errors = outcome(session, flags, cmd, offset, length)
    if cmd in (CMD_TRIM, CMD_WRITE_ZEROES) and isinstance(errors, set) and 0 in errors:
        length = min(length, ZERO_LEN)
        offset = ZERO_AT + offset % (ZERO_LEN - length + 1)
    return offset, length


@st.composite
def request_case(draw: st.DrawFn, exports: dict[str, Export]) -> tuple[Session, tuple, bytes]:
    export = exports[draw(st.sampled_from(EXPORTS))]
    structured = draw(st.booleans())
    queries = draw(st.sampled_from([(), (BASE,), (BITMAP,), (BASE, BITMAP)])) if structured else ()
    session = Session(export, structured, dict(enumerate(queries, start=1)))
    stream = b""
    for handle in range(1, draw(st.integers(1, 8)) + 1):
        cmd, flags, offset, length = draw(one_request())
        offset, length = sanitize(session, cmd, flags, offset, length)
        magic = draw(mostly(st.just(REQUEST_MAGIC), st.integers(0, 2**32 - 1), 20))
        stream += request(cmd, offset, length, flags=flags, handle=handle, magic=magic)
        if cmd != CMD_WRITE:
            continue
        if length > MiB:  # not sent in full: the last request, cut short
            stream += bytes(min(length, 4096))
            break
        ok = 0 in outcome(session, flags, cmd, offset, length) and magic == REQUEST_MAGIC
        if ok:  # the bytes already there: the export does not change
            stream += export.data[offset : offset + length]
        else:
            stream += random.Random(draw(st.integers(0, 2**16))).randbytes(length)
    ending = mostly(st.sampled_from([b"", request(2, handle=99)]), st.binary(max_size=40), 3)
    stream += draw(ending)
    return session, queries, stream


def go_prefix(export: str, structured: bool, queries: tuple[str, ...]) -> bytes:
    prefix = struct.pack(">I", 3)
    if structured:
        prefix += option(8)
    if queries:
        prefix += option(10, meta_data(export, *queries))
    return prefix + option(7, info_data(export))


# The harness.


@pytest.fixture
def fuzz_target(registry: ExportRegistry, server: Any, caplog: pytest.LogCaptureFixture) -> Any:
    """(exports model, count of cases) after zeroing the zero region; checks at the end."""
    import nbd

    device = registry.open_export("vol")
    for offset, length in ZEROED:
        device.zero(offset, length, punch=True)
    device.flush()
    device.close()
    exports = {name: Export(name, read_export(registry, name), b"") for name in EXPORTS}
    for model in exports.values():
        model.snapshot = exports["vol@1"].data
    canary = nbd.NBD()
    canary.set_export_name("vol")
    canary.connect_unix(server.path)
    fake = isinstance(registry, FakeRegistry)
    yield exports, CASES if fake else max(CASES // 10, 1)
    assert canary.pread(1 << 20, 0) == exports["vol"].data[: 1 << 20]  # other clients unharmed
    assert server.statistics()["connections_open"] == 1  # the canary's only
    canary.shutdown()
    for name, model in exports.items():
        assert read_export(registry, name) == model.data, f"{name} was changed"
    errors = [r for r in caplog.records if r.name.startswith("shadowblk") and r.levelno >= 40]
    assert errors == []


def read_export(registry: ExportRegistry, name: str) -> bytes:
    device = registry.open_export(name)
    try:
        return bytes(device.pread(0, device.size))
    finally:
        device.close()


def run_cases(strategy: Any, count: int, case: Callable[[Any], None]) -> int:
    ran = [0]

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def each(example: Any) -> None:
        ran[0] += 1
        case(example)

    each()
    return ran[0]


def test_fuzz_handshakes(fuzz_target: Any, server: Any) -> None:
    exports, count = fuzz_target

    def case(stream: bytes) -> None:
        check_handshake(stream, exchange(server.path, stream))

    assert run_cases(handshake_stream(), count // 2, case) >= count // 2


def test_fuzz_requests(fuzz_target: Any, server: Any) -> None:
    exports, count = fuzz_target

    def case(example: tuple[Session, tuple, bytes]) -> None:
        session, queries, stream = example
        prefix = go_prefix(session.export.name, session.structured, queries)
        output = exchange(server.path, prefix + stream)
        cursor = Cursor(output)
        contexts = parse_go_handshake(cursor, session.structured, queries)
        assert sorted(contexts.values()) == sorted(queries)
        check_replies(output[cursor.pos :], Session(session.export, session.structured, contexts),
                      stream)  # fmt: skip

    wanted = count - count // 2
    assert run_cases(request_case(exports), wanted, case) >= wanted
