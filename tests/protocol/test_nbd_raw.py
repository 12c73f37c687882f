"""Raw-socket exchanges: exact bytes, malformed handshakes and requests, isolation."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rawclient import request

from shadowblk.provider.api import ExportRegistry

Connect = Callable[..., Any]
Reference = Callable[[str, int, int], bytes]
RawFactory = Callable[[], Any]

IHAVEOPT = 0x49484156454F5054
NBDMAGIC = 0x4E42444D41474943
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = 2**31 + 1, 2**31 + 2, 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EPERM, EINVAL, ENOSPC = 1, 22, 28
MiB = 1024 * 1024


@pytest.fixture
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Malformed input is the client's fault: the server logs no error for it."""
    yield
    errors = [r for r in caplog.records if r.name.startswith("shadowblk") and r.levelno >= 40]
    assert errors == []


def assert_still_serving(raw: RawFactory, reference: Reference) -> None:
    client = raw()
    client.go("vol")
    client.request(CMD_READ, 4096, 512, handle=77)
    assert client.reply(512) == (0, 77, reference("vol", 4096, 512))


def export_size(registry: ExportRegistry, name: str) -> int:
    device = registry.open_export(name)
    device.close()
    return int(device.size)


def info_data(name: str, *infos: int) -> bytes:
    raw_name = name.encode()
    packed = struct.pack(f">H{len(infos)}H", len(infos), *infos)
    return struct.pack(">I", len(raw_name)) + raw_name + packed


# The handshake, byte for byte.


def test_greeting_advertises_fixed_newstyle_and_no_zeroes(raw: RawFactory) -> None:
    assert raw().greeting() == (NBDMAGIC, IHAVEOPT, 0b11)


def test_export_name_reply_with_and_without_padding(raw: RawFactory, reference: Reference) -> None:
    for flags, padding in [(1, 124), (3, 0)]:
        client = raw()
        client.greeting()
        client.sock.sendall(struct.pack(">I", flags))
        client.send_option(OPT_EXPORT_NAME, b"vol@1")
        size, tflags = struct.unpack(">QH", client.recv_exactly(10))
        assert tflags == 1 | 2 | 4 | 8 | 256 | 1024  # HAS_FLAGS, READ_ONLY, FLUSH, FUA,
        # CAN_MULTI_CONN, SEND_CACHE: no TRIM/WRITE_ZEROES on a snapshot, no DF unstructured
        assert client.recv_exactly(padding) == bytes(padding)
        client.request(CMD_READ, 0, 8, handle=5)
        assert client.reply(8) == (0, 5, reference("vol@1", 0, 8))


def test_list_and_unknown_options(raw: RawFactory, registry: ExportRegistry) -> None:
    client = raw()
    client.greeting()
    client.sock.sendall(struct.pack(">I", 1))
    client.send_option(OPT_LIST)
    names = []
    while (reply := client.option_reply())[1] == REP_SERVER:
        (length,) = struct.unpack_from(">I", reply[2])
        names.append(reply[2][4 : 4 + length].decode())
    assert reply[:2] == (OPT_LIST, REP_ACK)
    assert names == [name for name, _ in registry.export_names()]
    for option in (11, 4, 0, 12, 12345, 2**32 - 1):  # EXTENDED_HEADERS, PEEK_EXPORT, ...
        client.send_option(option, b"some data")
        assert client.option_reply()[:2] == (option, REP_ERR_UNSUP)
    for option in (5, 8, 9, 10):  # STARTTLS, STRUCTURED_REPLY, {LIST,SET}_META_CONTEXT
        client.send_option(option, b"some data")
        assert client.option_reply()[:2] == (option, REP_ERR_INVALID)
    client.send_option(5)  # STARTTLS on the Unix socket: no TLS there, by policy
    assert client.option_reply()[:2] == (5, REP_ERR_POLICY)
    client.send_option(OPT_LIST, b"x")
    assert client.option_reply()[:2] == (OPT_LIST, REP_ERR_INVALID)
    client.send_option(OPT_ABORT)
    assert client.option_reply()[:2] == (OPT_ABORT, REP_ACK)
    client.assert_closed()


def test_info_replies(raw: RawFactory, registry: ExportRegistry) -> None:
    client = raw()
    client.greeting()
    client.sock.sendall(struct.pack(">I", 3))
    client.send_option(OPT_INFO, info_data("vol", 3, 1, 2, 3, 999))
    infos = {}
    while (reply := client.option_reply())[1] == REP_INFO:
        (kind,) = struct.unpack_from(">H", reply[2])
        infos[kind] = reply[2][2:]
    assert reply[:2] == (OPT_INFO, REP_ACK)
    assert sorted(infos) == [0, 1, 2, 3]
    tflags = 1 | 4 | 8 | 32 | 64 | 256 | 1024 | 2048  # FLUSH FUA TRIM ZEROES MULTI CACHE FAST
    assert struct.unpack(">QH", infos[0]) == (export_size(registry, "vol"), tflags)
    assert infos[1] == b"vol"
    assert infos[2].decode() == dict(registry.export_names())["vol"]
    assert struct.unpack(">III", infos[3])[::2] == (1, 32 * MiB)


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (info_data("nope"), REP_ERR_UNKNOWN),
        (info_data("vol")[:-1], REP_ERR_INVALID),  # count overruns the data
        (info_data("vol") + b"\0", REP_ERR_INVALID),  # trailing bytes
        (struct.pack(">I", 99) + b"vol\0\0", REP_ERR_INVALID),  # name overruns
        (b"\0\0", REP_ERR_INVALID),
        (struct.pack(">I", 3) + b"\xff\xfe\xfd" + b"\0\0", REP_ERR_INVALID),  # not UTF-8
    ],
)
def test_bad_go_is_refused_and_haggling_goes_on(
    raw: RawFactory, reference: Reference, data: bytes, reply: int
) -> None:
    client = raw()
    client.greeting()
    client.sock.sendall(struct.pack(">I", 1))
    client.send_option(OPT_GO, data)
    assert client.option_reply()[:2] == (OPT_GO, reply)
    client.send_option(OPT_GO, info_data("vol"))
    while (answer := client.option_reply())[1] == REP_INFO:
        pass
    assert answer[:2] == (OPT_GO, REP_ACK)
    client.request(CMD_READ, 0, 4, handle=9)
    assert client.reply(4) == (0, 9, reference("vol", 0, 4))


# Malformed handshakes: closed cleanly, and the server goes on.

OPTION = struct.Struct(">QII")
MALFORMED = {
    "unknown-client-flag": (struct.pack(">I", 1 << 2), False),
    "all-client-flags": (struct.pack(">I", 0xFFFFFFFF), False),
    "truncated-client-flags": (b"\0\0", True),
    "bad-option-magic": (struct.pack(">I", 1) + OPTION.pack(NBDMAGIC, OPT_GO, 0), False),
    "huge-option-length": (struct.pack(">I", 1) + OPTION.pack(IHAVEOPT, OPT_GO, 2**32 - 1), False),
    "truncated-option-header": (struct.pack(">I", 1) + OPTION.pack(IHAVEOPT, OPT_GO, 9)[:12], True),
    "truncated-option": (
        struct.pack(">I", 1) + OPTION.pack(IHAVEOPT, OPT_GO, 100) + b"x" * 9,
        True,
    ),
    "list-without-fixed-newstyle": (
        struct.pack(">I", 0) + OPTION.pack(IHAVEOPT, OPT_LIST, 0),
        False,
    ),
    "unknown-export-name": (
        struct.pack(">I", 1) + OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, 4) + b"nope",
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_handshake_closes_cleanly(
    raw: RawFactory, server: Any, reference: Reference, no_errors_logged: None, case: str
) -> None:
    data, half_close = MALFORMED[case]
    client = raw()
    client.greeting()
    client.sock.sendall(data)
    if half_close:
        client.sock.shutdown(socket.SHUT_WR)
    client.assert_closed()
    assert server.statistics()["connections_open"] == 0
    assert_still_serving(raw, reference)


def test_client_that_leaves_at_once(
    raw: RawFactory, server: Any, reference: Reference, no_errors_logged: None
) -> None:
    client = raw()
    client.sock.shutdown(socket.SHUT_WR)
    client.greeting()
    client.assert_closed()
    assert server.statistics()["connections_open"] == 0
    assert_still_serving(raw, reference)


# Transmission, byte for byte.


def test_unknown_command_and_unknown_flags_are_einval(
    raw: RawFactory, reference: Reference, no_errors_logged: None
) -> None:
    client = raw()
    client.go("vol")
    client.request(99, 0, 512, handle=1)
    assert client.reply() == (EINVAL, 1, b"")
    client.request(CMD_READ, 0, 512, flags=1 << 7, handle=2)
    assert client.reply() == (EINVAL, 2, b"")
    client.request(CMD_WRITE, 0, 4, flags=1 << 2, handle=3, payload=b"abcd")  # DF on a write
    assert client.reply() == (EINVAL, 3, b"")
    assert reference("vol", 0, 4) != b"abcd"
    client.request(CMD_READ, 0, 512, flags=1, handle=4)  # FUA is accepted on any command
    assert client.reply(512) == (0, 4, reference("vol", 0, 512))


def test_bad_request_magic_disconnects(
    raw: RawFactory, server: Any, fake: Any, reference: Reference, no_errors_logged: None
) -> None:
    client = raw()
    client.go("vol")
    client.request(CMD_READ, 0, 512, magic=0x12345678)
    client.assert_closed()
    assert fake.open_devices == []  # released before the stream was closed
    assert server.statistics()["connections_open"] == 0
    assert_still_serving(raw, reference)


def test_disconnect_answers_requests_in_flight_then_closes(
    raw: RawFactory, fake: Any, reference: Reference
) -> None:
    client = raw()
    client.go("vol")
    client.request(CMD_WRITE, 0, 4, flags=1, handle=1, payload=b"wxyz")  # FUA: in a thread
    client.request(CMD_FLUSH, handle=2)
    client.request(CMD_DISC, handle=3)
    replies = {client.reply()[:2] for _ in range(2)}
    assert replies == {(0, 1), (0, 2)}
    client.assert_closed()
    assert fake.open_devices == []
    assert fake.durable_pread("vol", 0, 4) == b"wxyz"


def test_write_payload_above_32_mib_is_discarded_with_einval(
    raw: RawFactory, reference: Reference, no_errors_logged: None
) -> None:
    client = raw()
    client.go("vol")
    before = reference("vol", 0, 16)
    length = 32 * MiB + 1
    client.request(CMD_WRITE, 0, length, handle=1, payload=b"\x99" * length)
    assert client.reply() == (EINVAL, 1, b"")
    assert reference("vol", 0, 16) == before
    client.request(CMD_READ, 0, 16, handle=2)  # the payload was consumed: still in step
    assert client.reply(16) == (0, 2, before)


def test_absurd_write_payload_disconnects(
    raw: RawFactory, server: Any, reference: Reference, no_errors_logged: None
) -> None:
    client = raw()
    client.go("vol")
    client.request(CMD_WRITE, 0, 2**32 - 1, handle=1)
    client.assert_closed()
    assert_still_serving(raw, reference)


def test_write_errors_consume_the_payload(
    raw: RawFactory, registry: ExportRegistry, reference: Reference
) -> None:
    client = raw()
    client.go("vol@1")
    client.request(CMD_WRITE, 0, 4096, handle=1, payload=b"\x01" * 4096)
    assert client.reply() == (EPERM, 1, b"")
    client.request(CMD_READ, 0, 8, handle=2)
    assert client.reply(8) == (0, 2, reference("vol@1", 0, 8))
    client = raw()
    client.go("vol")
    end = export_size(registry, "vol")
    client.request(CMD_WRITE, end - 8, 4096, handle=3, payload=b"\x02" * 4096)
    assert client.reply() == (ENOSPC, 3, b"")
    client.request(CMD_READ, end - 8, 8, handle=4)
    assert client.reply(8) == (0, 4, reference("vol", end - 8, 8))


def test_a_broken_connection_leaves_others_alone(
    raw: RawFactory, connect: Connect, reference: Reference, no_errors_logged: None
) -> None:
    h = connect("vol")
    h.pwrite(b"first", 0)
    bad = raw()
    bad.go("vol")
    bad.request(CMD_READ, 0, 1, magic=0)
    bad.assert_closed()
    h.pwrite(b"second", 8)
    assert h.pread(5, 0) == b"first"
    assert reference("vol", 8, 6) == b"second"


# Structured replies, byte for byte.


def test_structured_read_chunks_on_the_wire(raw: RawFactory, reference: Reference) -> None:
    from rawclient import CHUNK_DATA, CHUNK_ERROR, CHUNK_NONE, REPLY_FLAG_DONE

    client = raw()
    client.go("vol@1", structured=True)
    client.request(CMD_READ, 1000, 300, handle=0xABCDEF0123)  # one chunk: no hole look-up
    (chunk,) = client.chunks()
    assert (chunk.flags, chunk.type, chunk.handle) == (REPLY_FLAG_DONE, CHUNK_DATA, 0xABCDEF0123)
    assert chunk.payload == struct.pack(">Q", 1000) + reference("vol@1", 1000, 300)
    client.request(CMD_READ, 0, 0, handle=2)  # zero length: a lone NONE chunk
    (chunk,) = client.chunks()
    assert (chunk.flags, chunk.type, chunk.handle, chunk.payload) == (1, CHUNK_NONE, 2, b"")
    size = 16 * MiB
    client.request(CMD_READ, size - 1, 2, handle=3)
    (chunk,) = client.chunks()
    assert (chunk.flags, chunk.type, chunk.handle) == (REPLY_FLAG_DONE, CHUNK_ERROR, 3)
    error, message = chunk.error
    assert error == EINVAL and "past the end" in message
    assert len(chunk.payload) == 6 + len(message.encode())
    client.request(CMD_WRITE, 0, 4, handle=4, payload=b"abcd")  # errors of other commands
    (chunk,) = client.chunks()
    assert (chunk.type, chunk.error[0]) == (CHUNK_ERROR, EPERM)
    client.request(CMD_FLUSH, handle=5)  # successes without data: simple replies
    assert client.reply() == (0, 5, b"")


def test_df_needs_structured_replies(raw: RawFactory, reference: Reference) -> None:
    client = raw()
    client.go("vol")
    client.request(CMD_READ, 0, 512, flags=1 << 2, handle=1)  # DF, not advertised
    assert client.reply() == (EINVAL, 1, b"")
    client.request(CMD_READ, 0, 512, handle=2)
    assert client.reply(512) == (0, 2, reference("vol", 0, 512))


def test_flush_with_an_offset_or_length_is_einval(raw: RawFactory) -> None:
    client = raw()
    client.go("vol")
    client.request(CMD_FLUSH, 512, 0, handle=1)
    client.request(CMD_FLUSH, 0, 512, handle=2)
    client.request(CMD_FLUSH, handle=3)
    replies = {client.reply()[:2] for _ in range(3)}
    assert replies == {(EINVAL, 1), (EINVAL, 2), (0, 3)}


def test_commands_beyond_the_table_are_einval(raw: RawFactory, reference: Reference) -> None:
    client = raw()
    client.go("vol", structured=True)
    for handle, cmd in enumerate([8, 9, 0xFFFF]):
        client.request(cmd, 0, 512, handle=handle)
        (chunk,) = client.chunks()
        assert (chunk.handle, chunk.error[0]) == (handle, EINVAL)
    client.request(CMD_READ, 0, 8, handle=99)
    (chunk,) = client.chunks()
    assert chunk.payload[8:] == reference("vol", 0, 8)


def test_starttls_on_the_unix_socket_is_refused_by_policy(raw: RawFactory) -> None:
    client = raw()
    client.start()
    client.send_option(5)
    assert client.option_reply()[:2] == (5, REP_ERR_POLICY)
    client.send_option(5, b"x")
    assert client.option_reply()[:2] == (5, REP_ERR_INVALID)
    client.send_option(OPT_GO, info_data("vol"))
    while (answer := client.option_reply())[1] == REP_INFO:
        pass
    assert answer[:2] == (OPT_GO, REP_ACK)


def test_batched_replies_go_out_while_the_reader_waits_for_a_slot(
    raw: RawFactory, fake: Any, reference: Reference
) -> None:
    # reads answered inline wait in the batch queue; the reader must send them before it
    # waits for a worker slot held by blocked flushes, or the client would never see them
    gate = fake.stores["vol"].flush_gate = threading.Event()
    client = raw()
    client.go("vol")
    reads = b"".join(request(CMD_READ, i * 512, 512, handle=i) for i in range(8))
    flushes = b"".join(request(CMD_FLUSH, handle=100 + i) for i in range(24))  # > MAX_BLOCKING
    client.sock.sendall(reads + flushes)  # one buffer: the reader finds them all at once
    try:
        for i in range(8):
            error, handle, data = client.reply(512)
            assert (error, handle, data) == (0, i, reference("vol", i * 512, 512))
    finally:
        gate.set()
    assert sorted(client.reply()[1] for _ in range(24)) == list(range(100, 124))


# Pipelined small reads: the reader's fast path (reads.serve_buffered_reads).


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_reads_are_answered_in_order_around_other_requests(
    raw: RawFactory, reference: Reference, structured: bool
) -> None:
    # one buffer: reads, a write to a range read before it, a read of that range after it,
    # a read past the end, a read with a flag; each gets its reply, as if served in order
    client = raw()
    client.go("vol", structured=structured)
    before = reference("vol", 8192, 4096)
    new = bytes(range(256)) * 16
    size = 16 * MiB
    stream = b"".join(request(CMD_READ, i * 4096, 4096, handle=i) for i in range(12))
    stream += request(CMD_WRITE, 8192, 4096, handle=50) + new
    stream += request(CMD_READ, 8192, 4096, handle=51)
    stream += request(CMD_READ, size - 512, 1024, handle=52)  # past the end: EINVAL
    stream += request(CMD_READ, 4096, 512, flags=1, handle=53)  # FUA: the general path
    client.sock.sendall(stream)
    lengths = {**{i: 4096 for i in range(12)}, 51: 4096, 53: 512}
    replies = {}
    for _ in range(16):
        error, handle, data = _any_reply(client, lengths)
        replies[handle] = (error, data)
    for i in range(12):
        expected = before if i == 2 else reference("vol", i * 4096, 4096)
        assert replies[i] == (0, expected), f"read {i}"
    assert replies[50] == (0, b"")
    assert replies[51] == (0, new)
    assert replies[52][0] == EINVAL
    assert replies[53] == (0, reference("vol", 4096, 512))


def test_pipelined_reads_that_fail_get_errors_and_the_connection_goes_on(
    raw: RawFactory, fake: Any, reference: Reference
) -> None:
    client = raw()
    client.go("vol", structured=True)
    fake.stores["vol"].faults["read"] = OSError(5, "injected")
    client.sock.sendall(b"".join(request(CMD_READ, i * 512, 512, handle=i) for i in range(6)))
    errors = sorted((_any_reply(client, {})[:2]) for _ in range(6))
    assert errors == [(5, i) for i in range(6)]
    del fake.stores["vol"].faults["read"]
    client.sock.sendall(b"".join(request(CMD_READ, i * 512, 512, handle=i) for i in range(6)))
    for _ in range(6):
        error, handle, data = _any_reply(client, {})
        assert (error, data) == (0, reference("vol", handle * 512, 512))


@pytest.mark.parametrize("piece", [1, 7, 30])
def test_requests_arriving_in_pieces_are_served_in_order(
    raw: RawFactory,
    reference: Reference,
    no_errors_logged: None,
    caplog: pytest.LogCaptureFixture,
    piece: int,
) -> None:
    # the reader receives whatever part of the stream has arrived into its buffer and
    # parses only whole requests from it: headers and payloads cut anywhere, then a
    # stream cut inside a header, which closes the connection as dropped mid-message
    # (no error logged: the client's doing)
    caplog.set_level(logging.INFO, logger="shadowblk.provider.nbd")
    client = raw()
    client.go("vol")
    new = bytes(range(256)) * 2
    stream = request(CMD_READ, 4096, 512, handle=1)
    stream += request(CMD_WRITE, 8192, 512, handle=2) + new
    stream += request(CMD_READ, 8192, 512, handle=3) + request(CMD_READ, 0, 512, handle=4)
    for start in range(0, len(stream), piece):
        client.sock.sendall(stream[start : start + piece])
        time.sleep(0.002)  # pacing, so the server sees the pieces apart
    lengths = {1: 512, 3: 512, 4: 512}
    replies = [_any_reply(client, lengths) for _ in range(4)]
    assert replies == [
        (0, 1, reference("vol", 4096, 512)),
        (0, 2, b""),
        (0, 3, new),
        (0, 4, reference("vol", 0, 512)),
    ]
    client.sock.sendall(request(CMD_READ, 0, 512, handle=5)[: min(piece, 20)])
    client.sock.shutdown(socket.SHUT_WR)
    client.assert_closed()
    drops = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and "mid-message" in drops[0], drops


def _any_reply(client: Any, lengths: dict[int, int]) -> tuple[int, int, bytes]:
    """(error, handle, data) of the next reply: simple (with `lengths[handle]` bytes of data
    if it succeeded) or one structured chunk (data, error or none)."""
    (magic,) = struct.unpack(">I", client.recv_exactly(4))
    if magic == 0x67446698:
        error, handle = struct.unpack(">IQ", client.recv_exactly(12))
        return error, handle, b"" if error else client.recv_exactly(lengths.get(handle, 0))
    assert magic == 0x668E33EF, f"not a reply: {magic:#x}"
    flags, kind, handle, length = struct.unpack(">HHQI", client.recv_exactly(16))
    payload = client.recv_exactly(length)
    assert flags & 1, "one chunk per reply here"
    if kind == 2**15 + 1:
        return struct.unpack_from(">I", payload)[0], handle, b""
    return 0, handle, payload[8:] if kind == 1 else b""


FLOOD = """
import sys, threading
from rawclient import CMD_READ, RawClient, request
client = RawClient(sys.argv[1])
client.go()

def drain():
    while client.sock.recv(1 << 20):
        pass

threading.Thread(target=drain, daemon=True).start()
print("flowing", flush=True)
batch = request(CMD_READ, 0, 0) * 256  # 16-byte replies: sending never blocks
while True:
    client.sock.sendall(batch)
"""


def test_a_connection_flooding_requests_does_not_starve_another(
    raw: RawFactory, fake: Any, server: Any  # fake: the fake registry only (reads are free)
) -> None:
    # A client in another process pipelines reads without end, so the server always has
    # requests waiting on that connection and serves them on direct system calls, which
    # never yield by themselves (wire.py, "Direct system calls"). DIRECT_SLICE makes the
    # connection yield, so another one is answered meanwhile; without it this read would
    # wait for the flood to end. The other client's socket timeout is the liveness bound.
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, server.path],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flood.stdout is not None and flood.stdout.readline() == "flowing\n"
        other = raw()
        other.sock.settimeout(10)
        other.go()
        for handle in range(1, 21):
            other.request(CMD_READ, handle * 4096, 4096, handle=handle)
            error, got, data = other.reply(4096)
            assert (error, got, len(data)) == (0, handle, 4096)
        assert flood.poll() is None, "the flood ended early: it proves nothing"
    finally:
        flood.kill()
        flood.wait()
