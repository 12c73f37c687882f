"""The NBD servers a run compares, as context managers that always tear them down.

Each server runs in its own process group (`start_new_session`): a Ctrl-C on the terminal
reaches the bench only, which then stops every server itself, in order, from its
ExitStack: SIGTERM to the group, SIGKILL if it has not exited within `STOP_TIMEOUT`.
Every server listens on a Unix socket and logs to a file beside it.

Cache modes, the same for every server: the page cache, no O_DIRECT (shadowblk reads and
writes through the page cache; nbdkit's file plugin with `cache=default`; qemu-nbd with
`--cache=writeback --aio=threads`, its defaults, given explicitly).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from shadowblk.tools.client import ControlClient

SHADOWBLK = Path(sys.executable).with_name("shadowblk")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0

PYTHON_PLUGIN = '''\
"""A minimal nbdkit python passthrough plugin: the ceiling of Python behind a C server."""
import os

import nbdkit

API_VERSION = 2
path = None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError("unknown parameter " + key)
    path = value


def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def get_size(h):
    return os.fstat(h).st_size


def pread(h, buf, offset, flags):
    n = os.preadv(h, [buf], offset)
    if n != len(buf):
        raise RuntimeError("short read")


def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)


def flush(h, flags):
    os.fdatasync(h)


def close(h):
    os.close(h)
'''


@dataclass
class Server:
    """A running NBD server: its name (as the tables show it), socket and export."""

    name: str
    process: subprocess.Popen[bytes]
    socket: Path
    export: str

    def uri(self, export: str | None = None) -> str:
        name = quote(self.export if export is None else export, safe="@")
        return f"nbd+unix:///{name}?socket={self.socket}"


@dataclass
class Shadowblk(Server):
    state_dir: Path

    def control(self, timeout: float = 600.0) -> ControlClient:
        return ControlClient.connect(self.state_dir, timeout=timeout)

    def rss_mib(self) -> float:
        """VmRSS of the serve process, MiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.process.pid}")


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `argv` in a new process group, stdout and stderr to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process group, wait, SIGKILL the group if it lingers. (Only while the
    leader is not reaped: after that its group id may belong to another process.)"""
    if process.poll() is None:
        killpg(process, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            killpg(process, signal.SIGKILL)
            process.wait()


def killpg(process: subprocess.Popen[Any], sig: int) -> None:
    """Signal the group `process` leads (call it only while `process` is not reaped)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


@contextmanager
def running(argv: list[str], log: Path, sig: int = signal.SIGTERM) -> Iterator[
    subprocess.Popen[bytes]
]:
    process = spawn(argv, log)
    try:
        yield process
    finally:
        stop(process, sig)


def wait_socket(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    """Return once `path` accepts a connection; raise if the process exits first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited {process.returncode}:\n{_tail(log)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(os.fspath(path))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.args!r} never listened on {path}:\n{_tail(log)}")
        time.sleep(0.02)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


@contextmanager
def shadowblk(state_dir: Path, export: str = "") -> Iterator[Shadowblk]:
    """`shadowblk serve` on `state_dir`; ready once its control socket answers."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    log = state_dir.parent / f"{state_dir.name}.serve.log"
    argv = [os.fspath(SHADOWBLK), "--state-dir", os.fspath(state_dir), "serve"]
    with running(argv, log) as process:
        wait_socket(state_dir / "control.sock", process, log)
        wait_socket(state_dir / "nbd.sock", process, log)
        yield Shadowblk("shadowblk", process, state_dir / "nbd.sock", export, state_dir)
        stop(process)  # a clean SIGTERM exit is part of the contract: check it
        if process.returncode != 0:
            raise RuntimeError(f"shadowblk serve exited {process.returncode}:\n{_tail(log)}")


@contextmanager
def nbdkit_file(image: Path, sock: Path) -> Iterator[Server]:
    argv = ["nbdkit", "--foreground", "--unix", os.fspath(sock), "file", os.fspath(image),
            "cache=default"]  # fmt: skip
    with _server("nbdkit file", argv, sock) as server:
        yield server


@contextmanager
def nbdkit_python(image: Path, sock: Path) -> Iterator[Server]:
    script = sock.with_name("passthrough_plugin.py")
    script.write_text(PYTHON_PLUGIN)
    argv = ["nbdkit", "--foreground", "--unix", os.fspath(sock), "python", os.fspath(script),
            f"file={image}"]  # fmt: skip
    with _server("nbdkit python", argv, sock) as server:
        yield server


@contextmanager
def qemu_nbd(image: Path, sock: Path, fmt: str = "raw") -> Iterator[Server]:
    argv = ["qemu-nbd", "--persistent", "--shared=16", f"--socket={sock}", f"--format={fmt}",
            "--export-name=disk", "--cache=writeback", "--aio=threads", os.fspath(image)]
    with _server(f"qemu-nbd {fmt}", argv, sock, export="disk") as server:
        yield server


@contextmanager
def _server(name: str, argv: list[str], sock: Path, export: str = "") -> Iterator[Server]:
    log = sock.with_suffix(".log")
    sock.unlink(missing_ok=True)
    with running(argv, log) as process:
        wait_socket(sock, process, log)
        yield Server(name, process, sock, export)


def run_checked(argv: list[str], timeout: float = 600.0) -> str:
    """Run a short helper command (qemu-img, mkfs.xfs, ...); its stdout, or an error."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout
