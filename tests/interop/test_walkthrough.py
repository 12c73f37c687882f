"""The walkthrough: what shadowblk must show, done as a new user would, with real clients.

A volume of SHADOWBLK_WALK_MIB MiB (default 256) is filled with random data by nbdcopy.
Snapshots are taken with `shadowblk create` between rounds of overwrites that qemu-io makes
(one invocation, many `-c 'write -P N OFF LEN'`, at 64 KiB-aligned and unaligned offsets).
Each snapshot's sha256 is recorded from the origin as nbdcopy reads it just before the
create, and checked against an in-test model of every write; every snapshot export, read
with nbdcopy, must keep that sha256:
- after more overwrites;
- across a SIGTERM restart of the service;
- across a SIGKILL in the middle of a libnbd write load, and the restart after it;
- after the middle snapshot is deleted, which must free exactly the bytes `shadowblk list`
  said only it needed: in `stats`, in `volume list` and in the diff area file (its data
  extents; its st_blocks, which also count ext4's extent tree, to less than a chunk).
A second test takes 50 snapshots of a small volume and checks that one 4 KiB write then
preserves one chunk, once, for all of them.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd
import pytest

from shadowblk.tools.client import ControlClient

if TYPE_CHECKING:
    from conftest import Clients, Digest

MiB = 1 << 20
CHUNK = 64 * 1024  # the default chunk size, which the volumes here use
MIB = int(os.environ.get("SHADOWBLK_WALK_MIB", "256"))
SIZE = MIB * MiB
FRACTION = 0.3  # of the volume's chunks, overwritten between snapshots
MIN_WRITE = 512  # every write touches each of its chunks with at least this many bytes
LOAD_WRITES = 300  # writes of the load acknowledged before the SIGKILL
LOAD_BLOCK = 4096
WAIT = 120.0  # failsafe for a wait that would otherwise hang; never a pass condition

Write = tuple[int, int]  # offset, length


def chunks_of(writes: list[Write]) -> set[int]:
    return {
        c for off, length in writes for c in range(off // CHUNK, (off + length - 1) // CHUNK + 1)
    }


def plan_writes(rnd: random.Random, fraction: float) -> list[Write]:
    """Writes over `fraction` of the chunks: whole aligned chunks, unaligned chunk-long
    writes that straddle two chunks, and unaligned writes inside one chunk."""
    slots = rnd.sample(range(SIZE // CHUNK), k=max(1, round(fraction * SIZE / CHUNK)))
    writes = []
    for i, slot in enumerate(slots):
        base = slot * CHUNK
        if i % 3 == 0:
            writes.append((base, CHUNK))
        elif i % 3 == 1 and base + 2 * CHUNK <= SIZE:
            writes.append((base + rnd.randrange(MIN_WRITE, CHUNK - MIN_WRITE), CHUNK))
        else:
            start = rnd.randrange(0, CHUNK - MIN_WRITE)
            writes.append((base + start, rnd.randrange(MIN_WRITE, CHUNK - start + 1)))
    return writes


@dataclass
class Usage:
    """A volume's diff usage, as four different sources tell it."""

    stats: int  # the `stats` op: engine.volumes.v.diff_bytes
    listed: int  # `volume list --json`: diff_bytes
    data: int  # bytes of <diff_area>/chunks.dat that hold data (SEEK_DATA / SEEK_HOLE)
    allocated: int  # st_blocks * 512 of that file: data, and ext4's extent-tree blocks

    def minus(self, other: Usage) -> Usage:
        return Usage(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


def data_bytes(path: Path) -> int:
    """How many bytes of `path` hold data: the sum of its SEEK_DATA..SEEK_HOLE extents."""
    total = offset = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data past offset
                    return total
                raise
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            total += offset - start
    finally:
        os.close(fd)


@dataclass
class Walk:
    factory: Any
    state_dir: Path
    clients: Clients
    rnd: random.Random
    service: Any = None
    model: bytearray = field(default_factory=bytearray)  # the origin, as the test wrote it
    snapshots: dict[str, Digest] = field(default_factory=dict)  # name -> recorded digest

    def start(self) -> None:
        self.service = self.factory(self.state_dir)

    def cli(self, *args: str) -> Any:
        return self.service.cli.run(*args)

    def json(self, *args: str) -> Any:
        return self.service.cli.json(*args)

    def fill(self, path: Path) -> None:
        self.cli("volume", "create", "v", "--size", f"{MIB}M")
        self.clients.random_file(path, SIZE, self.rnd)
        self.clients.copy_in(path, "v")
        self.model = bytearray(path.read_bytes())
        path.unlink()

    def overwrite(self, writes: list[Write], epoch: int) -> None:
        """One qemu-io run with one `-c write` per write; epochs use disjoint patterns."""
        argv = ["qemu-io", "-f", "raw"]
        for i, (offset, length) in enumerate(writes):
            pattern = 1 + 80 * (epoch - 1) + i % 80
            argv += ["-c", f"write -P {pattern} {offset} {length}"]
            self.model[offset : offset + length] = bytes([pattern]) * length
        out = self.clients.run(*argv, self.clients.uri("v")).stdout
        assert "failed" not in out, f"qemu-io writes ({len(writes)}) reported:\n{out[-2000:]}"

    def check_origin(self, when: str) -> Digest:
        """The origin as nbdcopy reads it must be the model."""
        got = self.clients.digest("v")
        want = self.clients.digest_of(self.model)
        bad = sorted(got.differing(want))[:10]
        assert got == want, f"nbdcopy {self.clients.uri('v')} -: {when}: chunks {bad} differ"
        return got

    def snapshot(self, name: str) -> None:
        """Record the origin's digest, then `shadowblk create v`: it must be `name`."""
        origin = self.check_origin(f"before {name}")
        created = self.json("create", "v")
        assert [s["name"] for s in created["snapshots"]] == [name], "shadowblk create v"
        self.snapshots[name] = origin

    def check_snapshots(self, when: str) -> None:
        listed = {s["name"]: s["state"] for s in self.json("list", "v")}
        assert listed == dict.fromkeys(self.snapshots, "ok"), f"shadowblk list v, {when}"
        for name, want in self.snapshots.items():
            got = self.clients.digest(name)
            bad = sorted(got.differing(want))[:10]
            assert got.sha256 == want.sha256, (
                f"nbdcopy {self.clients.uri(name)} -: {name} changed {when}: chunks {bad}"
            )

    def restart_after_sigterm(self) -> None:
        code = self.service.stop()
        assert code == 0, f"shadowblk serve exited {code} on SIGTERM:\n{self.service.log()}"
        self.start()

    def kill_under_load(self) -> set[int]:
        """SIGKILL the service while a libnbd thread writes random 4 KiB blocks; return the
        chunks the load wrote to (or may have: the write in flight)."""
        load = Load(self.clients.uri("v"), random.Random(self.rnd.random()))
        thread = threading.Thread(target=load.run, name="write-load", daemon=True)
        thread.start()
        try:
            assert load.going.wait(WAIT), f"the load never got going: {load.error!r}"
            assert load.error is None and self.service.process.poll() is None, load.error
            load.killed.set()
            self.service.kill()
        finally:
            load.stop.set()
            thread.join(WAIT)
        assert not thread.is_alive(), "the write load did not end after the SIGKILL"
        assert load.acked >= LOAD_WRITES
        return {block * LOAD_BLOCK // CHUNK for block in load.blocks}

    def usage(self) -> Usage:
        with ControlClient.connect(self.state_dir, timeout=WAIT) as control:
            stats = control.call("stats")["engine"]["volumes"]["v"]["diff_bytes"]
        (volume,) = self.json("volume", "list")
        chunks_dat = Path(volume["diff_area"]) / "chunks.dat"
        allocated = os.stat(chunks_dat).st_blocks * 512
        return Usage(stats, volume["diff_bytes"], data_bytes(chunks_dat), allocated)


class Load:
    """Random 4 KiB writes through libnbd until the service dies under them."""

    def __init__(self, uri: str, rnd: random.Random) -> None:
        self.uri = uri
        self.rnd = rnd
        self.acked = 0
        self.blocks: list[int] = []  # every block a write was sent to
        self.going = threading.Event()  # LOAD_WRITES writes were acknowledged
        self.killed = threading.Event()  # set just before the SIGKILL
        self.stop = threading.Event()  # set after it (or when the test fails before it)
        self.error: BaseException | None = None  # a failure while the service lived

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                block = self.rnd.randrange(SIZE // LOAD_BLOCK)
                self.blocks.append(block)
                h.pwrite(self.rnd.randbytes(LOAD_BLOCK), block * LOAD_BLOCK)
                self.acked += 1
                if self.acked == LOAD_WRITES:
                    self.going.set()
        except nbd.Error as e:
            if not self.killed.is_set():
                self.error = e
                self.going.set()


@pytest.mark.timeout(900)
def test_walkthrough(
    service_factory: Any, state_dir: Path, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    walk = Walk(service_factory, state_dir, clients, rnd)
    walk.start()
    walk.fill(short_tmp / "fill.img")
    walk.snapshot("v@1")
    first = plan_writes(rnd, FRACTION)
    walk.overwrite(first, epoch=1)
    walk.snapshot("v@2")
    # half over the same region as before (so v@2 gets data only it needs), half elsewhere
    second = rnd.sample(first, len(first) // 2) + plan_writes(rnd, FRACTION / 2)
    walk.overwrite(second, epoch=2)
    walk.check_origin("after the second overwrite")
    walk.check_snapshots("after the second overwrite")

    walk.restart_after_sigterm()
    walk.check_origin("after a SIGTERM restart")
    walk.check_snapshots("after a SIGTERM restart")

    loaded = walk.kill_under_load()
    walk.start()
    walk.check_snapshots("after a SIGKILL under load and a restart")
    walk.model = clients.read("v")  # whatever of the load survived: the origin's new model

    walk.snapshot("v@3")
    walk.overwrite(second, epoch=3)  # the same region again
    walk.check_snapshots("after the third overwrite")
    delete_the_middle_snapshot(walk, chunks_of(second) | loaded)


def delete_the_middle_snapshot(walk: Walk, written: set[int]) -> None:
    """Deleting v@2 frees exactly the bytes `shadowblk list` said only v@2 needed.

    v@2 alone needs the epoch-2 copy of a chunk written both after v@1 (the chunks that
    differ between v@1 and v@2) and after v@2. A lower bound of that figure: those chunks
    that also differ between v@2 and v@3; an upper bound: those among the chunks written
    after v@2 (`written`: the overwrite's and the load's). Between the two lie preserves
    whose origin write the SIGKILL lost (unflushed: allowed).
    """
    d1, d2, d3 = (walk.clients.digest(f"v@{n}") for n in (1, 2, 3))
    lower = len(d1.differing(d2) & d2.differing(d3)) * CHUNK
    upper = len(d1.differing(d2) & written) * CHUNK
    unique = {s["name"]: s["diff_bytes"] for s in walk.json("list", "v")}["v@2"]
    print(f"v@2: {unique} bytes only it needs; bounds from contents: {lower}..{upper}")
    assert lower > 0, "the walk gave v@2 no data of its own: the test is broken"
    assert lower <= unique <= upper, f"shadowblk list: v@2 diff_bytes {unique}"

    before = walk.usage()
    walk.cli("delete", "v@2")
    after = walk.usage()
    del walk.snapshots["v@2"]
    freed = before.minus(after)
    assert (freed.stats, freed.listed, freed.data) == (unique,) * 3, f"{before} -> {after}"
    # st_blocks also counts the extent tree, which punched holes may grow by a few blocks
    # (measured here: 1000 scattered 64 KiB holes, 24 KiB): never by a whole chunk
    assert abs(freed.allocated - unique) < CHUNK, f"{before} -> {after}"
    walk.check_snapshots("after deleting v@2")
    walk.check_origin("after deleting v@2")


SMALL = 8 * MiB
MANY = 50


def test_fifty_snapshots_one_copy(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    image = short_tmp / "s.img"
    sha = clients.random_file(image, SMALL, rnd)
    service.cli.run("volume", "create", "s", "--size", "8M")
    clients.copy_in(image, "s")
    offset, new = 5 * CHUNK + 4096, rnd.randbytes(4096)
    with ControlClient.connect(service.state_dir, timeout=WAIT) as control:
        names = [
            control.call("snapshot.create", volumes=["s"])["snapshots"][0]["name"]
            for _ in range(MANY)
        ]
        assert names == [f"s@{n}" for n in range(1, MANY + 1)]
        before = control.call("stats")["engine"]
        h = nbd.NBD()
        h.connect_uri(clients.uri("s"))
        h.pwrite(new, offset)
        h.flush()  # durable in the journal; the preserve may still be on its way
        h.shutdown()
        service.wait_preserves_applied("s")
        after = control.call("stats")["engine"]

    assert after["chunks_preserved"] - before["chunks_preserved"] == 1, f"{before} -> {after}"
    vol_before, vol_after = before["volumes"]["s"], after["volumes"]["s"]
    assert vol_after["entries"] - vol_before["entries"] == 1, f"{vol_before} -> {vol_after}"
    assert vol_after["diff_bytes"] - vol_before["diff_bytes"] == CHUNK
    for name in names:  # one preserved copy serves all fifty
        assert clients.digest(name).sha256 == sha, f"nbdcopy {clients.uri(name)} -"
    origin = bytearray(image.read_bytes())
    origin[offset : offset + len(new)] = new
    assert clients.digest("s") == clients.digest_of(origin), f"nbdcopy {clients.uri('s')} -"
