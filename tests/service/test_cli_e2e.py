"""The CLI against a real `shadowblk serve` subprocess, as a user or a script drives it."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import nbd

if TYPE_CHECKING:  # the shared fixtures' types, from tests/conftest.py
    from conftest import Cli, ServiceProcess

    StartService = Callable[..., ServiceProcess]

SNAPSHOT_KEYS = {"name", "id", "volume", "set", "created", "state"}


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    return lines[0]


def test_status_without_a_service_exits_3(cli: Cli) -> None:
    proc = cli.run("status", expect=3)
    assert one_line(proc.stderr).startswith("shadowblk: no-service: ")
    assert proc.stdout == ""


def test_status_with_a_stale_socket_exits_3(cli: Cli, state_dir: Path) -> None:
    state_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(state_dir / "control.sock"))
    stale.close()
    assert one_line(cli.run("status", expect=3).stderr).startswith("shadowblk: no-service: ")


def test_commands_need_the_service(cli: Cli) -> None:
    for args in (["volume", "list"], ["list"], ["create", "vol0"], ["delete", "vol0@1"]):
        proc = cli.run(*args, expect=3)
        assert "no shadowblk service" in one_line(proc.stderr)


def test_serve_refuses_a_hold_or_scrub_time_that_is_no_finite_number(
    cli: Cli, state_dir: Path
) -> None:
    """DESIGN.md: writes are held at most 10 s; NaN passes a plain range check."""
    for option, value in (("--hold-timeout", "nan"), ("--hold-timeout", "inf"),
                          ("--hold-timeout", "11"), ("--hold-timeout", "0"),
                          ("--scrub-interval", "nan"), ("--scrub-interval", "inf")):  # fmt: skip
        proc = cli.run("serve", "--no-fuse", option, value, expect=2, timeout=30)
        line = one_line(proc.stderr)
        assert option in line and "Invalid value" in line, line
    assert not (state_dir / "control.sock").exists()


def test_status_answers_with_listeners(service: ServiceProcess) -> None:
    status = service.cli.json("status")
    assert status["listeners"] == {
        "control": os.fspath(service.control_socket),
        "nbd": os.fspath(service.nbd_socket),
        "fuse": os.fspath(service.state_dir / "fuse"),
    }
    assert status["volumes"] == []
    for path in (service.control_socket, service.nbd_socket):
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, path
    human = service.cli.run("status").stdout
    assert "running" in human and os.fspath(service.nbd_socket) in human


def test_volume_create_list_remove(service: ServiceProcess, short_tmp: Path) -> None:
    cli = service.cli
    made = cli.json("volume", "create", "vol0", "--size", "1M", "--chunk-size", "4K", "--sparse")
    assert (made["name"], made["size"], made["chunk_size"], made["sparse"]) == (
        "vol0",
        1 << 20,
        4096,
        True,
    )
    (short_tmp / "disk.img").write_bytes(b"\0" * (64 << 10))
    cli.run("volume", "create", "adopted", "--backing", "disk.img", cwd=short_tmp)
    volumes = {v["name"]: v for v in cli.json("volume", "list")}
    assert set(volumes) == {"vol0", "adopted"}
    assert volumes["adopted"]["origin"] == os.fspath(short_tmp / "disk.img")
    assert volumes["adopted"]["size"] == 64 << 10
    assert "vol0" in cli.run("volume", "list").stdout

    again = cli.run("volume", "create", "vol0", "--size", "1M", expect=1)
    assert one_line(again.stderr).startswith("shadowblk: already-exists: ")
    cli.run("volume", "remove", "adopted")
    assert [v["name"] for v in cli.json("volume", "list")] == ["vol0"]
    assert (short_tmp / "disk.img").exists()  # an adopted origin is not shadowblk's to delete


def test_create_list_delete(service: ServiceProcess) -> None:
    cli = service.cli
    for name in ("vol0", "vol1"):
        cli.run("volume", "create", name, "--size", "1M", "--sparse")
    made = cli.json("create", "vol0", "vol1", "--label", "nightly")
    assert [s["name"] for s in made["snapshots"]] == ["vol0@1", "vol1@1"]
    assert all(s["set"] == made["set"] and s["label"] == "nightly" for s in made["snapshots"])
    assert [s["volume"] for s in made["snapshots"]] == ["vol0", "vol1"]
    cli.json("create", "vol0")
    cli.json("create", "vol0")

    listed = cli.json("list")
    assert [s["name"] for s in listed] == ["vol0@1", "vol0@2", "vol0@3", "vol1@1"]
    assert all(set(s) >= SNAPSHOT_KEYS for s in listed)
    assert [s["name"] for s in cli.json("list", "vol1")] == ["vol1@1"]
    assert "vol0@2" in cli.run("list").stdout
    assert "vol1@2" in cli.run("create", "vol1").stdout

    assert cli.json("delete", "--oldest", "vol0") == {"deleted": ["vol0@1"]}
    assert cli.json("delete", "--set", made["set"]) == {"deleted": ["vol1@1"]}
    assert cli.run("delete", "vol0@3").stdout == "deleted vol0@3\n"
    assert [s["name"] for s in cli.json("list")] == ["vol0@2", "vol1@2"]


def test_errors_are_one_line(service: ServiceProcess) -> None:
    cli = service.cli
    cli.run("volume", "create", "vol0", "--size", "1M", "--sparse")
    missing = cli.run("delete", "vol0@9", expect=1)
    assert missing.stderr == "shadowblk: not-found: no snapshot vol0@9\n"
    assert one_line(cli.run("create", "nosuch", expect=1).stderr).startswith(
        "shadowblk: not-found: "
    )
    usage = cli.run("volume", "create", "v", "--size", "lots", expect=2)
    assert one_line(usage.stderr).startswith("shadowblk: usage: ")
    assert one_line(cli.run("delete", expect=2).stderr).startswith("shadowblk: usage: ")
    cli.run("create", "vol0")
    busy = cli.run("volume", "remove", "vol0", expect=1)
    assert one_line(busy.stderr).startswith("shadowblk: busy: ")
    assert cli.run("status").returncode == 0  # the service is still there


def test_a_second_service_on_the_state_dir_is_refused(service: ServiceProcess) -> None:
    proc = service.cli.run("serve", expect=None, timeout=60)
    assert proc.returncode != 0
    assert one_line(proc.stderr).startswith("shadowblk: locked: ")
    assert service.cli.run("status").returncode == 0  # the first one still serves


def test_init_volume_is_created_once(service_factory: StartService, state_dir: Path) -> None:
    first = service_factory(state_dir, "--init-volume", "demo=1M", "--init-volume", "d2=64K")
    volumes = {v["name"]: v["size"] for v in first.cli.json("volume", "list")}
    assert volumes == {"demo": 1 << 20, "d2": 64 << 10}
    assert first.stop() == 0
    second = service_factory(state_dir, "--init-volume", "demo=1M")
    assert [v["name"] for v in second.cli.json("volume", "list")] == ["demo", "d2"]


def test_sigint_stops_cleanly_and_removes_the_sockets(
    service_factory: StartService, state_dir: Path
) -> None:
    svc = service_factory(state_dir)
    svc.process.send_signal(signal.SIGINT)
    assert svc.process.wait(timeout=60) == 0
    assert not svc.control_socket.exists()
    assert "SIGINT received" in svc.log()
    svc.cli.run("status", expect=3)


def test_the_nbd_socket_serves_the_volume(service: ServiceProcess) -> None:
    service.cli.run("volume", "create", "demo", "--size", "1M", "--sparse")
    uri = f"nbd+unix:///demo?socket={service.nbd_socket}"
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 1 << 20


def test_status_of_a_service_that_never_answers_is_not_0(cli: Cli, state_dir: Path) -> None:
    state_dir.mkdir()
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(os.fspath(state_dir / "control.sock"))
        mute.listen(8)  # connections are accepted by the kernel, never answered
        proc = cli.run("status", "--timeout", "0.2", expect=1)
    assert one_line(proc.stderr).startswith("shadowblk: no-answer: ")


def test_a_snapshot_in_use_is_deleted_only_with_force(service: ServiceProcess) -> None:
    service.cli.run("volume", "create", "v", "--size", "1M")
    service.cli.run("create", "v")
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///v@1?socket={service.nbd_socket}")
    try:
        busy = service.cli.run("delete", "v@1", expect=1)
        assert busy.stderr.startswith("shadowblk: busy:"), busy.stderr
        assert [s["name"] for s in service.cli.json("list")] == ["v@1"]
        service.cli.run("delete", "--force", "v@1")
        assert service.cli.json("list") == []
        try:
            h.pread(4096, 0)
            raise AssertionError("a read of a deleted snapshot succeeded")
        except nbd.Error as e:
            assert e.errno is not None
    finally:
        h.shutdown()


def test_volume_set_limits_and_the_snapshot_count(service: ServiceProcess) -> None:
    cli = service.cli
    made = cli.json("volume", "create", "v", "--size", "1M", "--sparse", "--max-diff", "10%")
    assert (made["max_diff"], made["max_snapshots"]) == ((1 << 20) // 10, 512)
    assert cli.json("volume", "set", "v", "--max-diff", "none")["max_diff"] is None
    changed = cli.json("volume", "set", "v", "--max-diff", "64K", "--full-policy",
                       "fail-writes", "--max-snapshots", "2")  # fmt: skip
    assert (changed["max_diff"], changed["full_policy"], changed["max_snapshots"]) == (
        65536, "fail-writes", 2
    )
    assert cli.json("volume", "list")[0]["max_snapshots"] == 2  # kept by the service
    cli.run("create", "v")
    cli.run("create", "v")
    refused = cli.run("create", "v", expect=1)
    assert "max-snapshots" in refused.stderr and "volume set v" in refused.stderr
    cli.run("volume", "set", "v", "--max-snapshots", "4096")
    cli.run("create", "v")
    bad = cli.run("volume", "set", "v", "--max-diff", "150%", expect=1)
    assert "invalid-argument" in bad.stderr
    usage = cli.run("volume", "set", "v", expect=2)
    assert "nothing to change" in usage.stderr
