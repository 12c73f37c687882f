"""Fixtures of the protocol layer: a registry, an NBD server in a thread, clients.

`registry` is parametrized over REGISTRY_FACTORIES. Each factory is a context manager that
takes a scratch directory and yields an ExportRegistry with two exports: "vol" (read-write,
16 MiB) and "vol@1" (read-only, a snapshot of vol). Tests read reference contents through
`registry.open_export(...)`, never assume them. The in-memory fake below also offers test
hooks (durable contents, fault injection, held writes, gated flushes); tests that need them
take the `fake` fixture, which skips for other registries. To run the suite against the real
engine, add a factory to REGISTRY_FACTORIES.

The server runs `NBDServer.serve_unix` under its own `trio.run` in a background thread, so
tests are plain synchronous code driving real clients (python3-libnbd, raw sockets,
subprocesses). Readiness is an event set after `task_status.started()`; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
import trio

from shadowblk.provider.api import BlockDevice, ExportRegistry
from shadowblk.provider.engine import Engine
from shadowblk.provider.errors import NotFound, OutOfRange, ReadOnly
from shadowblk.provider.nbd import NBDServer

MiB = 1024 * 1024
VOL_SIZE = 16 * MiB
TIMEOUT = 30.0  # failsafe for anything that would otherwise hang; never a pass condition


# The in-memory fake engine.


class FakeStore:
    """One export's bytes: `data` (what reads see) and `durable` (what a crash keeps)."""

    def __init__(self, data: bytearray, readonly: bool) -> None:
        self.data = data
        self.durable = bytearray(data)
        self.readonly = readonly
        self.lock = threading.Lock()
        self.hold_writes = False  # write_nowait says False: the server must call write()
        self.blocking_writes = 0
        self.flushes = 0
        self.flush_gate: threading.Event | None = None
        self.faults: dict[str, BaseException] = {}

    def check(self, op: str, offset: int, length: int) -> None:
        fault = self.faults.get(op)
        if fault is not None:
            raise fault
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise OutOfRange(f"{offset}+{length} is past the end")

    def apply(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise ReadOnly("snapshots are read-only")
        self.check("write", offset, len(data))
        with self.lock:
            self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.check("flush", 0, 0)
        if self.flush_gate is not None and not self.flush_gate.wait(TIMEOUT):
            raise TimeoutError("flush gate never opened")
        with self.lock:
            self.durable[:] = self.data
            self.flushes += 1


class FakeDevice:
    chunk_size = 65536

    def __init__(self, name: str, store: FakeStore, registry: FakeRegistry) -> None:
        self.name = name
        self.size = len(store.data)
        self.readonly = store.readonly
        self._store = store
        self._registry = registry
        self._closed = False

    def _live(self) -> FakeStore:
        if self._closed:
            raise RuntimeError(f"{self.name}: used after close")
        return self._store

    def pread(self, offset: int, length: int) -> bytes:
        store = self._live()
        store.check("read", offset, length)
        with store.lock:
            return bytes(store.data[offset : offset + length])

    def write_nowait(self, offset: int, data: bytes | bytearray | memoryview) -> bool:
        store = self._live()
        if store.hold_writes and not store.readonly:
            return False
        store.apply(offset, data)
        return True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        store = self._live()
        store.apply(offset, data)
        store.blocking_writes += 1

    def flush(self) -> None:
        self._live().flush()

    def close(self) -> None:
        self._live()
        self._closed = True
        self._registry.closed(self)


class FakeRegistry:
    def __init__(self) -> None:
        origin = bytearray(random.Random(1).randbytes(VOL_SIZE))
        self.stores = {
            "vol": FakeStore(origin, readonly=False),
            "vol@1": FakeStore(bytearray(origin), readonly=True),
        }
        self.descriptions = {"vol": "volume vol", "vol@1": "snapshot 1 of vol"}
        self.open_devices: list[FakeDevice] = []
        self._lock = threading.Lock()

    def export_names(self) -> list[tuple[str, str]]:
        return [(name, self.descriptions[name]) for name in self.stores]

    def open_export(self, name: str) -> BlockDevice:
        if name not in self.stores:
            raise NotFound(f"no export {name!r}")
        device = FakeDevice(name, self.stores[name], self)
        with self._lock:
            self.open_devices.append(device)
        return device

    def closed(self, device: FakeDevice) -> None:
        with self._lock:
            self.open_devices.remove(device)

    # Test hooks.

    def durable_pread(self, name: str, offset: int, length: int) -> bytes:
        store = self.stores[name]
        with store.lock:
            return bytes(store.durable[offset : offset + length])


@contextlib.contextmanager
def fake_registry(scratch: Path) -> Iterator[ExportRegistry]:
    registry = FakeRegistry()
    yield registry
    assert registry.open_devices == [], "an export was left open"


@contextlib.contextmanager
def engine_registry(scratch: Path) -> Iterator[ExportRegistry]:
    """The real engine: "vol" filled with data, snapshot "vol@1", then "vol" changed."""
    engine = Engine.open(scratch / "state")
    try:
        engine.create_volume("vol", size=16 << 20)
        rnd = random.Random(7)
        device = engine.open_export("vol")
        device.write(0, rnd.randbytes(16 << 20))
        engine.create_snapshot_set(["vol"])
        device.write(4 << 20, rnd.randbytes(1 << 20))
        device.close()
        yield engine
        assert not any(engine.statistics()["exports"].values()), "an export was left open"
    finally:
        engine.close()


REGISTRY_FACTORIES: dict[str, Callable[[Path], contextlib.AbstractContextManager[Any]]] = {
    "fake": fake_registry,
    "engine": engine_registry,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every protocol test runs against every registry, except the ones that need the
    fake's test hooks (they take `fake`), which run against the fake only: no skips."""
    if "registry" in metafunc.fixturenames:
        names = ["fake"] if "fake" in metafunc.fixturenames else sorted(REGISTRY_FACTORIES)
        metafunc.parametrize("registry", names, indirect=True)


@pytest.fixture
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExportRegistry]:
    with REGISTRY_FACTORIES[request.param](tmp_path) as reg:
        yield reg


@pytest.fixture
def fake(registry: ExportRegistry) -> FakeRegistry:
    assert isinstance(registry, FakeRegistry)
    return registry


@pytest.fixture
def reference(registry: ExportRegistry) -> Callable[[str, int, int], bytes]:
    """reference(export, offset, length): the bytes, straight from the registry (not NBD)."""

    def read(name: str, offset: int, length: int) -> bytes:
        device = registry.open_export(name)
        try:
            return device.pread(offset, length)
        finally:
            device.close()

    return read


# The server, in a thread of its own.


class ServerThread:
    def __init__(self, registry: ExportRegistry, path: str) -> None:
        self.server = NBDServer(registry)
        self.path = path
        self._ready = threading.Event()
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="nbd-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(TIMEOUT):
            raise RuntimeError(f"server did not start: {self._error!r}")

    def stop(self) -> None:
        assert self._scope is not None and self._token is not None
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "server did not stop"
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.server.serve_unix, self.path)
                self._ready.set()

    def statistics(self) -> dict[str, int]:
        assert self._token is not None
        return trio.from_thread.run_sync(self.server.statistics, trio_token=self._token)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.path}"


@pytest.fixture
def server(registry: ExportRegistry) -> Iterator[ServerThread]:
    directory = tempfile.mkdtemp(prefix="sbk-nbd-")  # short: AF_UNIX paths are limited
    thread = ServerThread(registry, str(Path(directory) / "nbd.sock"))
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
        shutil.rmtree(directory)


# Clients.


@pytest.fixture
def connect(server: ServerThread) -> Iterator[Callable[..., Any]]:
    """connect(export="vol", *, opt_mode=False, handshake_flags=None) -> a libnbd handle.

    Strict mode is off so that requests libnbd would refuse itself (past the end, zero
    length, writes to a read-only export) reach the server."""
    handles: list[Any] = []

    def open_handle(export: str = "vol", *, opt_mode: bool = False, **options: Any) -> Any:
        h = nbd.NBD()
        handles.append(h)
        h.set_strict_mode(0)
        h.set_export_name(export)
        h.set_opt_mode(opt_mode)
        for name, value in options.items():
            getattr(h, f"set_{name}")(value)
        h.connect_unix(server.path)
        return h

    yield open_handle
    for h in handles:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


class RawClient:
    """A plain socket speaking NBD by hand, for malformed and low-level exchanges."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)

    def recv_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError(f"end of stream after {len(data)} of {size} bytes")
            data += chunk
        return data

    def greeting(self) -> tuple[int, int, int]:
        return struct.unpack(">QQH", self.recv_exactly(18))

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """(option, reply type, payload) of the next option reply."""
        magic, option, reply, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == 0x3E889045565A9
        return option, reply, self.recv_exactly(length)

    def go(self, export: str = "vol") -> None:
        """Greeting, client flags, NBD_OPT_GO: leaves the connection in transmission."""
        self.greeting()
        self.sock.sendall(struct.pack(">I", 3))
        name = export.encode()
        self.send_option(7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            _, reply, _ = self.option_reply()
            if reply != 3:  # NBD_REP_INFO
                assert reply == 1, f"NBD_OPT_GO failed: {reply:#x}"
                return

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        handle: int = 1,
        magic: int = 0x25609513,
        payload: bytes = b"",
    ) -> None:
        header = struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length)
        self.sock.sendall(header + payload)

    def reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data) of a simple reply; data only if it succeeded."""
        magic, error, handle = struct.unpack(">IIQ", self.recv_exactly(16))
        assert magic == 0x67446698
        return error, handle, b"" if error else self.recv_exactly(data_length)

    def assert_closed(self) -> None:
        """The server ended the connection cleanly: end of stream, no reset."""
        assert self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server: ServerThread) -> Iterator[Callable[[], RawClient]]:
    clients: list[RawClient] = []

    def open_raw() -> RawClient:
        clients.append(RawClient(server.path))
        return clients[-1]

    yield open_raw
    for client in clients:
        client.close()
