"""The listener and the connection boundary, in-process under trio."""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
from functools import partial

import pytest
import trio
import trio.testing

from shadowblk.provider.api import ExportRegistry
from shadowblk.provider.errors import InvalidArgument, Locked
from shadowblk.provider.nbd import NBDServer

NBDMAGIC = 0x4E42444D41474943


@pytest.fixture
def sock_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("nbd", numbered=True) / "s")


async def greeting_from(path: str) -> bytes:
    stream = await trio.open_unix_socket(path)
    async with stream:
        data = b""
        while len(data) < 18:
            chunk = await stream.receive_some(18 - len(data))
            assert chunk
            data += chunk
        return data


async def test_serve_unix_replaces_a_stale_socket_and_removes_its_own(
    registry: ExportRegistry, sock_path: str
) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # leaves the file: nobody listens
    server = NBDServer(registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_unix, sock_path)
        mode = os.lstat(sock_path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert struct.unpack(">Q", (await greeting_from(sock_path))[:8]) == (NBDMAGIC,)
        nursery.cancel_scope.cancel()
    assert not await trio.Path(sock_path).exists()
    assert server.statistics()["connections_total"] == 1


async def test_serve_unix_refuses_to_replace_a_file(
    registry: ExportRegistry, sock_path: str
) -> None:
    with open(sock_path, "w") as f:  # noqa: ASYNC230 - a test fixture file
        f.write("precious")
    with pytest.raises(InvalidArgument):
        await NBDServer(registry).serve_unix(sock_path)
    with open(sock_path) as f:  # noqa: ASYNC230
        assert f.read() == "precious"


class BrokenRegistry:
    """A registry whose engine has a bug."""

    def export_names(self) -> list[tuple[str, str]]:
        return [("vol", "")]

    def open_export(self, name: str) -> object:
        raise RuntimeError("engine bug")


async def test_handle_stream_contains_an_engine_bug(caplog: pytest.LogCaptureFixture) -> None:
    server, client = trio.testing.memory_stream_pair()
    nbd_server = NBDServer(BrokenRegistry())  # type: ignore[arg-type]
    name = b"vol"
    go = struct.pack(">IQII", 1, 0x49484156454F5054, 7, 4 + len(name) + 2)
    go += struct.pack(">I", len(name)) + name + b"\0\0"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nbd_server.handle_stream, server)
        await client.send_all(go)
        received = b""
        while chunk := await client.receive_some():
            received += chunk
    assert received[:8] == struct.pack(">Q", NBDMAGIC) and len(received) == 18
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info and "engine bug" in str(errors[0].exc_info[1])
    assert nbd_server.statistics()["connections_open"] == 0


async def test_serve_unix_refuses_a_live_socket(registry: ExportRegistry, sock_path: str) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(NBDServer(registry).serve_unix, sock_path)
        with pytest.raises(Locked):
            await NBDServer(registry).serve_unix(sock_path)
        assert struct.unpack(">Q", (await greeting_from(sock_path))[:8]) == (NBDMAGIC,)
        nursery.cancel_scope.cancel()


async def test_serve_tcp_on_loopback_reports_its_address(registry: ExportRegistry) -> None:
    server = NBDServer(registry)
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(partial(server.serve_tcp, "127.0.0.1", 0))
        assert address[0] == "127.0.0.1" and address[1] > 0
        stream = await trio.open_tcp_stream("127.0.0.1", address[1])
        async with stream:
            data = b""
            while len(data) < 18:
                chunk = await stream.receive_some(18 - len(data))
                assert chunk
                data += chunk
        assert struct.unpack(">QQH", data) == (NBDMAGIC, 0x49484156454F5054, 3)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.7"])
async def test_serve_tcp_refuses_plain_text_off_loopback(
    registry: ExportRegistry, host: str
) -> None:
    with pytest.raises(InvalidArgument, match="not a loopback address"):
        await NBDServer(registry).serve_tcp(host, 10809)


def test_loopback_names() -> None:
    from shadowblk.provider.nbd.tls import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("")
    assert not is_loopback("192.0.2.7")
