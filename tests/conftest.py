"""Fixtures every test layer may use.

- `short_tmp`: a fresh directory with a short path (unix socket paths must stay under 108
  bytes, which pytest's tmp_path does not promise); removed afterwards.
- `state_dir`: `short_tmp / "state"`, not created (the service creates it).
- `cli`: a `Cli` bound to `state_dir`: `cli.run("volume", "list")` runs the installed
  `shadowblk` console script in a subprocess and checks its exit code; `cli.json("list")`
  adds `--json` and parses stdout.
- `service`: a real `shadowblk serve` subprocess on `state_dir`, ready (its `status`
  answers) when the test starts, SIGTERMed at teardown (which must exit 0). It yields a
  `ServiceProcess`: `.cli`, `.state_dir`, `.control_socket`, `.nbd_socket`, `.process`,
  `.log()` (its stderr so far).
- `service_factory`: `service_factory(state_dir, *serve_args)` starts one more such service
  (other options, several state directories); each is stopped, and must exit 0, at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shadowblk.tools.client import ControlClient

SHADOWBLK = Path(sys.executable).with_name("shadowblk")
READY_DEADLINE = 120.0  # seconds; a bound on the wait, not a figure the tests check
STOP_TIMEOUT = 60.0
SETTLE_LIMIT = 60.0  # seconds for pending preserves to finish: a liveness bound


@dataclass
class Cli:
    """Runs `shadowblk --state-dir STATE_DIR ...` as a user would."""

    state_dir: Path

    def run(
        self, *args: str, expect: int | None = 0, timeout: float = 120, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run and check the exit code (`expect=None`: any); stdout and stderr are text."""
        argv = [os.fspath(SHADOWBLK), "--state-dir", os.fspath(self.state_dir), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if expect is not None and proc.returncode != expect:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}, expected {expect}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path
    cli: Cli
    killed: bool = False

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def nbd_socket(self) -> Path:
        return self.state_dir / "nbd.sock"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log: {self.log_path} is gone)"

    def wait_preserves_applied(self, volume: str) -> None:
        """Poll `stats` until no preserve of `volume` is pending: its entries are indexed
        and its overlays written back (a FLUSH need not wait for that when the journal
        holds the writes)."""
        deadline = time.monotonic() + SETTLE_LIMIT
        with ControlClient.connect(self.state_dir) as client:
            while client.call("stats")["engine"]["volumes"][volume]["pending"]:
                assert time.monotonic() < deadline, f"the preserves of {volume} never finished"
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (a crash): `stop` and the fixtures then expect no clean exit from it."""
        self.process.kill()
        self.process.wait()
        self.killed = True

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit code (SIGKILL if it does not stop); 0 for a
        service this test killed on purpose."""
        if self.killed:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_service(state_dir: Path, *serve_args: str) -> ServiceProcess:
    """Start `shadowblk serve` and return once `shadowblk status` answers."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.parent / f"serve-{state_dir.name}-{time.monotonic_ns()}.log"
    argv = [os.fspath(SHADOWBLK), "--state-dir", os.fspath(state_dir), "serve", *serve_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    service = ServiceProcess(process, state_dir, log_path, Cli(state_dir))
    try:
        _wait_ready(service)
    except BaseException:
        service.stop()
        raise
    return service


def _wait_ready(service: ServiceProcess) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while service.cli.run("status", expect=None).returncode != 0:
        if service.process.poll() is not None:
            code = service.process.returncode
            raise AssertionError(f"shadowblk serve exited {code}:\n{service.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"shadowblk serve never answered status:\n{service.log()}")
        time.sleep(0.05)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sbk-"))
    try:
        yield path
    finally:
        clear_mounts(path)
        shutil.rmtree(path, ignore_errors=True)


def clear_mounts(path: Path) -> None:
    """What a test (or a service it killed) left mounted under `path`: filesystems on loop
    devices over files there, the loop devices, then any mount under it (a dead FUSE)."""
    from shadowblk.mount import host

    for argv in host.cleanup_commands(path):
        subprocess.run(argv, capture_output=True, check=False)
    prefix = str(path) + "/"
    for _, mountpoint, _ in sorted(host.mounts(), key=lambda m: -len(m[1])):
        if mountpoint.startswith(prefix):
            subprocess.run(["umount", "--lazy", mountpoint], capture_output=True, check=False)


@pytest.fixture
def state_dir(short_tmp: Path) -> Path:
    return short_tmp / "state"


@pytest.fixture
def cli(state_dir: Path) -> Cli:
    return Cli(state_dir)


@pytest.fixture
def service(state_dir: Path) -> Iterator[ServiceProcess]:
    svc = start_service(state_dir)
    try:
        yield svc
    finally:
        code = svc.stop()
        print(f"--- shadowblk serve stderr ---\n{svc.log()}")
        if code != 0:
            raise AssertionError(f"shadowblk serve exited {code} on SIGTERM:\n{svc.log()}")


@pytest.fixture
def service_factory(short_tmp: Path) -> Iterator[Any]:
    """`service_factory(state_dir, *serve_args)`: `start_service`, stopped at teardown.

    (It depends on `short_tmp` so that it is torn down first: logs and state dirs live there.)
    """
    started: list[ServiceProcess] = []

    def start(state_dir: Path, *serve_args: str) -> ServiceProcess:
        svc = start_service(state_dir, *serve_args)
        started.append(svc)
        return svc

    yield start
    codes = [svc.stop() for svc in started]  # every one, before anything else can fail
    failures = []
    for svc, code in zip(started, codes, strict=True):
        print(f"--- shadowblk serve {svc.state_dir} stderr ---\n{svc.log()}")
        if code != 0:
            failures.append(f"{svc.state_dir}: exit {code}")
    if failures:
        raise AssertionError(f"shadowblk serve did not stop cleanly: {failures}")
