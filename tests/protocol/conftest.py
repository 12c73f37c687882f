"""Fixtures of the protocol layer: a registry, an NBD server in a thread, clients.

`registry` is parametrized over REGISTRY_FACTORIES. Each factory is a context manager that
takes a scratch directory and yields an ExportRegistry with two exports: "vol" (read-write,
16 MiB, 64 KiB chunks) and "vol@1" (read-only, a snapshot of vol). Tests read reference
contents through `registry.open_export(...)`, never assume them. The in-memory fake below
also offers test hooks (durable contents, fault injection, held writes and zeroes, gated
flushes, punched chunks, cache calls); tests that need them take the `fake` fixture and run
against the fake only. Every other test runs against the fake and the real engine.

The server runs `NBDServer.serve_unix` (and `serve_tcp` for TLS tests) under its own
`trio.run` in a background thread, so tests are plain synchronous code driving real
clients (python3-libnbd, raw sockets, subprocesses). Readiness is an event set after
`task_status.started()`; nothing sleeps. Raw-socket helpers are in rawclient.py, the fake
registry in fake_registry.py.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import nbd
import pytest
import trio
from fake_registry import TIMEOUT, FakeRegistry
from rawclient import RawClient

from shadowblk.provider.api import ExportRegistry
from shadowblk.provider.engine import Engine
from shadowblk.provider.nbd import NBDServer


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
    """`NBDServer.serve_unix(path)` and, with `tcp`, `serve_tcp("127.0.0.1", 0, tls=tls)`
    (its port in `tcp_port`), under their own `trio.run`."""

    def __init__(
        self,
        registry: ExportRegistry,
        path: str,
        *,
        tcp: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.server = NBDServer(registry)
        self.path = path
        self.tcp = tcp
        self.tls = tls
        self.tcp_port = 0
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
                if self.tcp:
                    serve = partial(self.server.serve_tcp, "127.0.0.1", 0, tls=self.tls)
                    (address,) = await nursery.start(serve)
                    self.tcp_port = address[1]
                self._ready.set()

    def statistics(self) -> dict[str, int]:
        assert self._token is not None
        return trio.from_thread.run_sync(self.server.statistics, trio_token=self._token)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.path}"


@pytest.fixture
def server_factory(registry: ExportRegistry) -> Iterator[Callable[..., ServerThread]]:
    """server_factory(*, tcp=False, tls=None) -> a started ServerThread, stopped at teardown."""
    started: list[tuple[ServerThread, str]] = []

    def start(**options: Any) -> ServerThread:
        directory = tempfile.mkdtemp(prefix="sbk-nbd-")  # short: AF_UNIX paths are limited
        thread = ServerThread(registry, str(Path(directory) / "nbd.sock"), **options)
        started.append((thread, directory))
        thread.start()
        return thread

    yield start
    for thread, directory in started:
        try:
            thread.stop()
        finally:
            shutil.rmtree(directory)


@pytest.fixture
def server(server_factory: Callable[..., ServerThread]) -> ServerThread:
    return server_factory()


# Clients.


@pytest.fixture
def connect(server: ServerThread) -> Iterator[Callable[..., Any]]:
    """connect(export="vol", *, opt_mode=False, contexts=(), **settings) -> a libnbd handle,
    each setting applied with `set_<name>`, each context with `add_meta_context`.

    Strict mode is off so that requests libnbd would refuse itself (past the end, zero
    length, writes to a read-only export) reach the server."""
    handles: list[Any] = []

    def open_handle(
        export: str = "vol", *, opt_mode: bool = False, contexts: tuple[str, ...] = (),
        **options: Any,
    ) -> Any:  # fmt: skip
        h = nbd.NBD()
        handles.append(h)
        h.set_strict_mode(0)
        h.set_export_name(export)
        h.set_opt_mode(opt_mode)
        for context in contexts:
            h.add_meta_context(context)
        for name, value in options.items():
            getattr(h, f"set_{name}")(value)
        h.connect_unix(server.path)
        return h

    yield open_handle
    for h in handles:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


@pytest.fixture
def raw(server: ServerThread) -> Iterator[Callable[[], RawClient]]:
    clients: list[RawClient] = []

    def open_raw() -> RawClient:
        clients.append(RawClient(server.path))
        return clients[-1]

    yield open_raw
    for client in clients:
        client.close()
