"""`shadowblk serve`: the service, in the foreground.

Lifetime, in order:
1. SIGINT/SIGTERM are watched from the start; either one cancels everything below.
2. The TCP listener's options are checked (`--nbd-listen` in plain text only on loopback;
   the TLS certificate and key load), before anything is opened.
3. The state directory is created if missing and the engine opened (`Engine.open` takes the
   state directory's lock: a second service there gets `Locked`).
4. `--init-volume` volumes that do not exist yet are created.
5. One nursery runs the NBD server (`<state>/nbd.sock`, and TCP with `--nbd-listen`) and
   the control server (`<state>/control.sock`); once all listen, readiness is reported
   (task_status and a "ready" log line naming the sockets).
6. On a signal: the listeners stop accepting, their connections are closed (in-flight engine
   calls finish first: worker threads are never abandoned), then the engine is closed from
   the exit stack, shielded from the cancellation, and `run` returns normally (exit 0).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import ssl
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from shadowblk.provider.api import HOLD_TIMEOUT, EngineAPI
from shadowblk.provider.engine import Engine
from shadowblk.provider.nbd.server import NBDServer
from shadowblk.provider.nbd.tls import check_listen_address, server_context

from .client import CONTROL_SOCKET, NBD_SOCKET
from .control import ControlServer
from .ops import OpContext, StatsSource
from .units import format_size

log = logging.getLogger("shadowblk.service")


@dataclass
class ServiceConfig:
    state_dir: Path
    init_volumes: list[tuple[str, int]] = field(default_factory=list)
    nbd_listen: tuple[str, int] | None = None  # (host, port) of the TCP listener
    tls_cert: Path | None = None  # with tls_key: TLS required on the TCP listener
    tls_key: Path | None = None
    fuse: bool = True  # the FUSE front-end (--no-fuse turns it off)
    fuse_dir: Path | None = None  # default: <state>/fuse
    scrub_interval: float | None = None  # seconds between background verifies; None: off
    hold_timeout: float = HOLD_TIMEOUT  # seconds snapshot creation may hold writes (hold-timeout)


class Service:
    def __init__(self, config: ServiceConfig) -> None:
        self.state_dir = Path(os.path.abspath(config.state_dir))
        self.control_path = self.state_dir / CONTROL_SOCKET
        self.nbd_path = self.state_dir / NBD_SOCKET
        self.init_volumes = config.init_volumes
        self.nbd_listen = config.nbd_listen
        self.tls_files = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls_files = (config.tls_cert, config.tls_key)
        self.tls: ssl.SSLContext | None = None  # loaded at start
        self.started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.nbd: NBDServer | None = None  # set while serving
        self.control: ControlServer | None = None  # set while serving; pushes events
        self.scrub_interval = config.scrub_interval
        self.hold_timeout = config.hold_timeout
        self.fuse_dir: Path | None = None
        if config.fuse:
            self.fuse_dir = Path(os.path.abspath(config.fuse_dir or self.state_dir / "fuse"))

    def info(self) -> dict[str, Any]:
        """What `status` says about the service itself."""
        return {
            "service": {
                "pid": os.getpid(),
                "state_dir": str(self.state_dir),
                "version": _version(),
                "started": self.started,
            },
            "listeners": self._listeners(),
        }

    def _listeners(self) -> dict[str, str]:
        listeners = {"control": str(self.control_path), "nbd": str(self.nbd_path)}
        if self.fuse_dir is not None:
            listeners["fuse"] = str(self.fuse_dir)
        if self.nbd_listen is not None:
            host, port = self.nbd_listen
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            listeners["nbd_tcp"] = where + (" (TLS)" if self.tls_files else "")
        return listeners

    async def run(
        self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until SIGINT or SIGTERM; then shut down cleanly and return.

        A failure (say `Locked` from `Engine.open`) is raised as itself, not wrapped in the
        nurseries' exception groups, so the CLI can report it in one line.
        """
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                    await self._serve(task_status)
        except BaseExceptionGroup as group:
            sole = _sole_exception(group)
            if sole is None:
                raise
            raise sole from None

    async def _serve(self, task_status: trio.TaskStatus[Service]) -> None:
        async with AsyncExitStack() as stack:
            await trio.to_thread.run_sync(self._check_tcp_listener)
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            engine = await trio.to_thread.run_sync(Engine.open, self.state_dir)
            stack.push_async_callback(_close_engine, engine)
            await trio.to_thread.run_sync(self._create_init_volumes, engine)
            async with trio.open_nursery() as servers:
                await self._start_servers(engine, servers)
                tcp = self._listeners().get("nbd_tcp")
                log.info(
                    "ready: control socket %s, NBD socket %s%s (pid %d)",
                    self.control_path, self.nbd_path, f", NBD on TCP {tcp}" if tcp else "",
                    os.getpid(),
                )
                task_status.started(self)
                await trio.sleep_forever()

    async def _start_servers(self, engine: EngineAPI, servers: trio.Nursery) -> None:
        self.nbd = NBDServer(engine)
        await servers.start(self.nbd.serve_unix, self.nbd_path)
        if self.nbd_listen is not None:
            host, port = self.nbd_listen
            await servers.start(partial(self.nbd.serve_tcp, host, port, tls=self.tls))
        fuse = None
        if self.fuse_dir is not None:
            from shadowblk.mount.frontend import FuseFrontend, mark_io_flusher

            mark_io_flusher()
            fuse = FuseFrontend(engine, self.fuse_dir, self.state_dir / "overlays")
            await servers.start(fuse.serve)
        if self.scrub_interval:
            servers.start_soon(_scrub, engine, self.scrub_interval)
        stats: dict[str, StatsSource] = {"nbd": self.nbd.statistics}
        ctx = OpContext(engine, self.info, stats, fuse, self.nbd, self.hold_timeout)
        self.control = ControlServer(ctx)
        stats["control"] = self.control.statistics
        await servers.start(self.control.serve_unix, self.control_path)

    def _check_tcp_listener(self) -> None:
        """Refuse plain text off loopback, load the TLS context: before opening anything."""
        if self.nbd_listen is None:
            return
        if self.tls_files is not None:
            self.tls = server_context(*self.tls_files)
        host, port = self.nbd_listen
        check_listen_address(host, port, tls=self.tls is not None)

    def _create_init_volumes(self, engine: EngineAPI) -> None:
        existing = {v.name: v for v in engine.volumes()}
        for name, size in self.init_volumes:
            if name in existing:
                if existing[name].size != size:
                    log.warning(
                        "volume %s exists with size %s; --init-volume %s=%s left it as it is",
                        name, format_size(existing[name].size), name, format_size(size),
                    )
                continue
            info = engine.create_volume(name, size=size)
            log.info("created volume %s (%s) at %s", name, format_size(info.size), info.origin)


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s received: stopping", signal.Signals(signum).name)
        scope.cancel()
        return


async def _scrub(engine: EngineAPI, interval: float) -> None:
    """The background scrub: `verify` of everything every `interval` seconds (damage marks
    the snapshots that read it, as a read would, and is logged)."""
    while True:
        await trio.sleep(interval)
        result = await trio.to_thread.run_sync(engine.verify)
        damaged = result["damaged"]
        if damaged:
            log.error("scrub: %d of %d preserved chunks damaged", len(damaged), result["checked"])
        else:
            log.info("scrub: %d preserved chunks checked, no damage", result["checked"])


async def _close_engine(engine: EngineAPI) -> None:
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(engine.close)
    log.info("engine closed")


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested single-member groups; None if there are several."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def _version() -> str:
    try:
        return metadata.version("shadowblk")
    except metadata.PackageNotFoundError:
        return "unknown"
