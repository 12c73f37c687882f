"""Interop smoke: real clients (nbdcopy, qemu-img, qemu-io, nbdinfo, python3-libnbd) against
a real `shadowblk serve`, and the service's refusals as a user meets them from the CLI and
the control socket.

Data written by one client is read back by another (or compared with the image file or an
in-test model), so a client that misreads what it wrote cannot hide a bug.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd

from shadowblk.tools.client import ControlClient

if TYPE_CHECKING:
    from conftest import Clients

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB
SMALL = 1 * MiB
SHADOWBLK = os.fspath(Path(sys.executable).with_name("shadowblk"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(clients: Clients, image: Path, export: str, *, expect: int) -> None:
    """`qemu-img compare` of a raw file with an export: 0 identical, 1 different."""
    clients.run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw",
        os.fspath(image), clients.uri(export), expect=expect,
    )  # fmt: skip


def qemu_img_write(clients: Clients, image: Path, export: str) -> None:
    """Write a raw image file over an existing export (no create: `-n`)."""
    clients.run(
        "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
        os.fspath(image), clients.uri(export),
    )  # fmt: skip


def open_handle(clients: Clients, export: str) -> nbd.NBD:
    """A libnbd handle in non-strict mode: requests libnbd would refuse reach the server."""
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(clients.uri(export))
    return h


def nbd_errno(action: Callable[[], object]) -> int:
    """Run `action` (a libnbd call expected to fail) and return the errno it failed with."""
    try:
        action()
    except nbd.Error as e:
        return int(e.errnum)
    raise AssertionError("the server accepted a request it had to refuse")


def test_images_written_by_nbdcopy_and_qemu_img_survive_in_snapshots(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    cli = service.cli
    images = {name: short_tmp / f"{name}.img" for name in ("v", "w")}
    shas = {name: clients.random_file(path, SIZE, rnd) for name, path in images.items()}
    later = short_tmp / "later.img"
    later_sha = clients.random_file(later, SIZE, rnd)
    for name in images:
        cli.run("volume", "create", name, "--size", "8M")

    clients.copy_in(images["v"], "v")
    qemu_img_write(clients, images["w"], "w")
    created = cli.json("create", "v", "w")
    assert sorted(s["name"] for s in created["snapshots"]) == ["v@1", "w@1"]
    qemu_img_write(clients, later, "v")  # each origin overwritten by the other client
    clients.copy_in(later, "w")

    for name, image in images.items():
        got = clients.digest(f"{name}@1").sha256
        assert got == shas[name], f"nbdcopy {clients.uri(name + '@1')} -: not the old image"
        compare(clients, image, f"{name}@1", expect=0)
        compare(clients, image, name, expect=1)
        assert sha256_file(image) == shas[name]  # the clients left the image file alone
        got = clients.digest(name).sha256
        assert got == later_sha, f"nbdcopy {clients.uri(name)} -: not the new image"
    compare(clients, later, "v", expect=0)


def test_nbdinfo_lists_exports_and_shows_snapshots_read_only(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    image = short_tmp / "v.img"
    clients.random_file(image, SMALL, rnd)
    service.cli.run("volume", "create", "v", "--size", "1M")
    clients.copy_in(image, "v")
    service.cli.run("create", "v")
    service.cli.run("create", "v")

    listing = json.loads(clients.run("nbdinfo", "--list", "--json", clients.uri("")).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert sorted(exports) == ["v", "v@1", "v@2"], "nbdinfo --list"
    assert [exports[n]["is_read_only"] for n in ("v", "v@1", "v@2")] == [False, True, True]
    assert {e["export-size"] for e in exports.values()} == {SMALL}

    info = json.loads(clients.run("nbdinfo", "--json", clients.uri("v@1")).stdout)
    (export,) = info["exports"]
    assert export["export-name"] == "v@1" and export["is_read_only"] is True
    text = clients.run("nbdinfo", clients.uri("v@1")).stdout
    assert "is_read_only: true" in text, f"nbdinfo {clients.uri('v@1')}:\n{text}"


def test_snapshot_refuses_writes_and_stays_unchanged(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    image = short_tmp / "v.img"
    sha = clients.random_file(image, SMALL, rnd)
    service.cli.run("volume", "create", "v", "--size", "1M")
    clients.copy_in(image, "v")
    service.cli.run("create", "v")

    argv = ("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4k", clients.uri("v@1"))
    failed = clients.fails(*argv)
    assert "Permission denied" in failed.stderr, f"{' '.join(argv)}: {failed.stderr}"
    h = open_handle(clients, "v@1")  # past qemu's own check: the server must say EPERM
    try:
        assert nbd_errno(lambda: h.pwrite(b"\xab" * 4096, 0)) == errno.EPERM
        assert nbd_errno(lambda: h.pwrite(b"\xab" * 1000, 70000)) == errno.EPERM
    finally:
        h.shutdown()
    assert clients.digest("v@1").sha256 == sha, "the snapshot changed under refused writes"
    compare(clients, image, "v@1", expect=0)
    compare(clients, image, "v", expect=0)


def test_unknown_export_and_reads_past_the_end_fail_and_the_service_goes_on(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    image = short_tmp / "v.img"
    sha = clients.random_file(image, SMALL, rnd)
    service.cli.run("volume", "create", "v", "--size", "1M")
    clients.copy_in(image, "v")

    failed = clients.fails("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", clients.uri("nope"))
    assert "nope" in failed.stderr, f"qemu-io on export nope: {failed.stderr}"
    clients.fails("nbdinfo", clients.uri("v@7"))
    clients.fails("qemu-io", "-f", "raw", "-c", "read 1020k 8k", clients.uri("v"))
    h = open_handle(clients, "v")  # the same requests, past libnbd's checks, to the server
    try:
        assert nbd_errno(lambda: h.pread(8 * KiB, 1020 * KiB)) == errno.EINVAL
        assert nbd_errno(lambda: h.pwrite(b"\xcd" * 8 * KiB, 1020 * KiB)) == errno.ENOSPC
        assert h.pread(4 * KiB, 1020 * KiB) == image.read_bytes()[1020 * KiB :]
    finally:
        h.shutdown()

    clients.run("qemu-io", "-r", "-f", "raw", "-c", "read 1020k 4k", clients.uri("v"))
    assert clients.digest("v").sha256 == sha, "a refused write past the end changed the volume"


# Epoch boundaries: each round writes pattern A (acknowledged), creates a snapshot over the
# control socket, then writes pattern B over the same ranges, all on one libnbd connection.
ROUNDS: list[tuple[str, list[tuple[int, int]]]] = [
    ("blocks within one chunk", [(0, 4096), (8192, 4096), (61440, 4096)]),
    ("unaligned, inside chunk 1", [(70000, 1000)]),
    ("aligned block", [(262144, 4096)]),
    ("a whole chunk", [(327680, 65536)]),
    ("across a chunk boundary", [(65536 * 7 - 2048, 4096)]),
    ("unaligned, across three chunks", [(65536 * 9 + 777, 2 * 65536 + 5)]),
    ("blocks in several chunks",
     [(65536 * 13, 4096), (65536 * 14 + 4096, 4096), (SMALL - 512, 512)]),
    ("unaligned, chunk 1 again", [(70000, 1000), (69999, 1)]),
]  # fmt: skip


def write_ranges(h: nbd.NBD, model: bytearray, ranges: list[tuple[int, int]], byte: int) -> None:
    for offset, length in ranges:
        data = bytes([byte]) * length
        h.pwrite(data, offset)
        model[offset : offset + length] = data


def test_epoch_boundaries_through_nbd(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    image = short_tmp / "v.img"
    clients.random_file(image, SMALL, rnd)
    service.cli.run("volume", "create", "v", "--size", "1M")
    clients.copy_in(image, "v")
    model = bytearray(image.read_bytes())
    expected: dict[str, bytes] = {}
    h = nbd.NBD()
    h.connect_uri(clients.uri("v"))
    try:
        with ControlClient.connect(service.state_dir, timeout=60) as control:
            for n, (_, ranges) in enumerate(ROUNDS, start=1):
                write_ranges(h, model, ranges, 0xA0 + n)  # pattern A of round n
                (snap,) = control.call("snapshot.create", volumes=["v"])["snapshots"]
                assert snap["name"] == f"v@{n}"
                expected[snap["name"]] = bytes(model)
                write_ranges(h, model, ranges, 0xB0 + n)  # pattern B of round n
    finally:
        h.shutdown()

    for n, (what, ranges) in enumerate(ROUNDS, start=1):
        snap = clients.read(f"v@{n}")  # nbdcopy, not the connection that wrote
        for offset, length in ranges:
            got = set(snap[offset : offset + length])
            assert got == {0xA0 + n}, f"v@{n} ({what}) at {offset}+{length}: bytes {got}"
        assert snap == expected[f"v@{n}"], f"v@{n} ({what}) differs outside the written ranges"
    origin = clients.read("v")
    assert origin == model, "the origin does not hold the last pattern B of every round"
    compare(clients, image, "v@1", expect=1)


def one_line_error(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    for word in words:
        assert word in lines[0], f"{word!r} not in the error: {lines[0]}"


def test_a_second_service_on_a_state_dir_is_refused(service: Any, clients: Clients) -> None:
    state = os.fspath(service.state_dir)
    failed = clients.fails(SHADOWBLK, "--state-dir", state, "serve", timeout=60)
    one_line_error(failed.stderr)
    assert "lock" in failed.stderr.lower(), f"shadowblk serve on a busy {state}: {failed.stderr}"
    service.cli.run("status")  # the first one still serves
    assert service.process.poll() is None


def test_a_backing_file_belongs_to_one_volume(
    service: Any, clients: Clients, short_tmp: Path, service_factory: Any, rnd: random.Random
) -> None:
    cli = service.cli
    backing = short_tmp / "backing.img"
    sha = clients.random_file(backing, SMALL, rnd)
    cli.run("volume", "create", "alpha", "--backing", os.fspath(backing))
    cli.run("volume", "create", "v", "--size", "1M")
    state = os.fspath(service.state_dir)

    def refused(*argv: str) -> str:
        failed = clients.fails(SHADOWBLK, "--state-dir", state, "volume", "create", *argv)
        one_line_error(failed.stderr)
        return failed.stderr

    assert "alpha" in refused("beta", "--backing", os.fspath(backing))
    (v_origin,) = [v["origin"] for v in cli.json("volume", "list") if v["name"] == "v"]
    assert "volume v" in refused("beta", "--backing", v_origin)
    (short_tmp / "symlink.img").symlink_to(backing)
    refused("beta", "--backing", os.fspath(short_tmp / "symlink.img"))
    os.link(backing, short_tmp / "hardlink.img")
    refused("beta", "--backing", os.fspath(short_tmp / "hardlink.img"))
    assert sorted(v["name"] for v in cli.json("volume", "list")) == ["alpha", "v"]

    other = service_factory(short_tmp / "other")
    failed = clients.fails(
        SHADOWBLK, "--state-dir", os.fspath(other.state_dir),
        "volume", "create", "x", "--backing", os.fspath(backing),
    )  # fmt: skip
    one_line_error(failed.stderr)
    assert "lock" in failed.stderr.lower() or "in use" in failed.stderr, failed.stderr
    assert other.cli.json("volume", "list") == []
    assert clients.digest("alpha").sha256 == sha, "a refused adoption changed the origin"


BAD_REQUESTS = [
    (b"not json\n", None),
    (b'{"id":1,"op":"nope"}\n', 1),
    (b'{"id":2,"op":"snapshot.create","args":{"volumes":"v"}}\n', 2),
    (b'{"id":3,"op":"snapshot.create","args":{"volumes":["v"],"bogus":1}}\n', 3),
]


def test_bad_control_requests_get_invalid_argument(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "1M")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(os.fspath(service.control_socket))
        replies = sock.makefile("rb")
        for line, rid in BAD_REQUESTS:
            sock.sendall(line)
            reply = json.loads(replies.readline())
            assert reply["ok"] is False, f"{line!r} got {reply}"
            assert reply["error"]["code"] == "invalid-argument", f"{line!r} got {reply}"
            assert reply["id"] == rid, f"{line!r} got {reply}"
        sock.sendall(b'{"id":4,"op":"status"}\n')
        reply = json.loads(replies.readline())
        assert reply["id"] == 4 and reply["ok"] is True, f"status after bad requests: {reply}"
        assert [v["name"] for v in reply["result"]["volumes"]] == ["v"]
    assert service.cli.json("list") == [], "a refused snapshot.create made a snapshot"
