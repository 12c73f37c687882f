"""Issue 3's interop suite: every real NBD client against the origin and a snapshot export.

The scenario most tests share (`build`): a sparse 64 MiB volume `v` gets phase A through a
libnbd handle held by the test (whole chunks of random data, one of them trimmed again),
then snapshot `v@1`, then phase B (overwrites, new data in holes, writes inside one chunk,
TRIMs, WRITE_ZEROES that may punch and that may not). The test keeps a model of each
export: its bytes, and per 4 KiB block what `base:allocation` must say (zero: never
written, or trimmed; data: written; either: zeroed with NO_HOLE, or zeroed in part).
Clients other than the one that
wrote are then checked against it:
- qemu-img info, convert (equal to nbdcopy's copy and to the model), compare (0, and 1
  after a change in a data chunk and in a hole), map; nbdinfo --map: each allocation map
  agrees with the model, and no range it calls zero holds data;
- nbdinfo --map=qemu:dirty-bitmap:v@N: exactly the chunks changed since v@N (on the
  origin), or between v@N and the export's snapshot;
- nbdinfo --list, --can, --is, --json block sizes;
- qemu-io read -P / write -P / discard / write -z / write -z -u on the origin, refused on
  the snapshot, which keeps its bytes (nbdcopy digest);
- nbdcopy file -> origin, snapshot -> file, origin -> another volume, with 1 and 4
  connections;
- nbdsh scripts that assert inside (pread/pwrite/flush/trim/zero/cache/DF/structured
  reads/block_status over both meta contexts; EPERM from the snapshot);
- nbdfuse + a loop mount: ext4 made and filled through NBD, snapshot, the origin changed
  while the snapshot's filesystem is fsck'ed and mounted read-only from another nbdfuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbd
import pytest

if TYPE_CHECKING:
    from conftest import Clients

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 64 * KiB  # the volumes' default chunk size
BLOCK = 4 * KiB  # the granularity of the allocation model
SIZE = 64 * MiB
LAST = SIZE // CHUNK - 1  # the last chunk
MAX_REQUEST = 32 * MiB
WAIT = 60.0  # failsafe for a wait that would otherwise hang; never a pass condition
EXPORTS = pytest.mark.parametrize("export", ["v", "v@1"], ids=["origin", "snapshot"])

ZERO, DATA, EITHER = b"Z"[0], b"D"[0], b"?"[0]  # what base:allocation must say of a block


@dataclass(frozen=True)
class Op:
    """One request of a phase: `write` (random bytes), `trim`, `zero` (WRITE_ZEROES that
    may punch a hole) or `zero-alloc` (WRITE_ZEROES with NO_HOLE)."""

    kind: str
    offset: int
    length: int

    def chunks(self) -> set[int]:
        return set(range(self.offset // CHUNK, (self.offset + self.length - 1) // CHUNK + 1))


def chunks(first: int, count: int = 1) -> tuple[int, int]:
    return first * CHUNK, count * CHUNK


PHASE_A = [  # before v@1
    Op("write", *chunks(0, 2)),
    Op("write", *chunks(10)),
    Op("write", *chunks(100, 4)),
    Op("write", *chunks(200, 4)),
    Op("trim", *chunks(201)),  # no snapshot yet: a plain hole again
    Op("write", *chunks(500)),
    Op("write", *chunks(LAST)),
]
PHASE_B = [  # after v@1
    Op("write", *chunks(1)),  # overwrites phase A
    Op("write", *chunks(101, 2)),
    Op("write", *chunks(300, 2)),  # data where v@1 has a hole
    Op("write", 400 * CHUNK + 8 * KiB, 4 * KiB),  # one block of a chunk v@1 has as a hole
    Op("write", 10 * CHUNK + 5000, 1000),  # unaligned, inside data
    Op("trim", *chunks(100)),  # data of v@1
    Op("trim", *chunks(600)),  # never written
    Op("trim", *chunks(700, 4)),
    Op("zero", *chunks(LAST)),
    Op("zero-alloc", *chunks(0)),
]
PHASE_C = [  # after v@2 (the dirty-bitmap test only)
    Op("write", *chunks(5)),
    Op("write", *chunks(101)),
    Op("write", 800 * CHUNK + 100, 10),
    Op("trim", *chunks(900)),
]


def touched(ops: list[Op]) -> set[int]:
    return set().union(*(op.chunks() for op in ops))


@dataclass
class Model:
    """What an export must read, and per 4 KiB block what its allocation map may say."""

    data: bytearray
    blocks: bytearray  # ZERO, DATA or EITHER per block

    @classmethod
    def empty(cls, size: int) -> Model:
        return cls(bytearray(size), bytearray([ZERO]) * (size // BLOCK))

    def copy(self) -> Model:
        return Model(bytearray(self.data), bytearray(self.blocks))

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self._mark(offset, len(data), DATA, DATA)

    def zero(self, offset: int, length: int, hole: bool) -> None:
        self.data[offset : offset + length] = bytes(length)
        self._mark(offset, length, ZERO if hole else EITHER, EITHER)

    def _mark(self, offset: int, length: int, whole: int, part: int) -> None:
        end = offset + length
        for b in range(offset // BLOCK, -(-end // BLOCK)):
            covered = offset <= b * BLOCK and (b + 1) * BLOCK <= end
            self.blocks[b] = whole if covered else part


@dataclass
class Scenario:
    models: dict[str, Model]  # export name -> model
    dirty: set[int]  # chunks phase B touched


def apply(h: nbd.NBD, model: Model, ops: list[Op], rnd: random.Random) -> None:
    for op in ops:
        if op.kind == "write":
            data = rnd.randbytes(op.length)
            h.pwrite(data, op.offset)
            model.write(op.offset, data)
        elif op.kind == "zero-alloc":
            h.zero(op.length, op.offset, nbd.CMD_FLAG_NO_HOLE)
            model.zero(op.offset, op.length, hole=False)
        else:
            (h.trim if op.kind == "trim" else h.zero)(op.length, op.offset)
            model.zero(op.offset, op.length, hole=True)
    h.flush()


@contextmanager
def handle(clients: Clients, export: str) -> Iterator[nbd.NBD]:
    h = nbd.NBD()
    h.connect_uri(clients.uri(export))
    try:
        yield h
    finally:
        h.shutdown()


def build(service: Any, clients: Clients, rnd: random.Random) -> Scenario:
    """Volume v: phase A, snapshot v@1, phase B (see the module's docstring)."""
    service.cli.run("volume", "create", "v", "--size", str(SIZE), "--sparse")
    origin = Model.empty(SIZE)
    with handle(clients, "v") as h:
        apply(h, origin, PHASE_A, rnd)
        service.cli.run("create", "v")
        snapshot = origin.copy()
        apply(h, origin, PHASE_B, rnd)
    return Scenario({"v": origin, "v@1": snapshot}, touched(PHASE_B))


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def span(numbers: set[int] | list[int]) -> str:
    """'3, 7-9, 12': sorted numbers as runs (for failure messages)."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


# --- qemu-img ----------------------------------------------------------------------------


@EXPORTS
def test_qemu_img_info_convert_and_compare(
    export: str, service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    scenario = build(service, clients, rnd)
    model = scenario.models[export]
    uri = clients.uri(export)
    info = json.loads(clients.run("qemu-img", "info", "--output=json", uri).stdout)
    assert (info["virtual-size"], info["format"]) == (SIZE, "raw"), f"qemu-img info {uri}: {info}"

    converted, copied = short_tmp / "converted.img", short_tmp / "copied.img"
    clients.run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, os.fspath(converted))
    clients.run("nbdcopy", uri, os.fspath(copied))
    want = hashlib.sha256(model.data).hexdigest()
    assert sha256(converted) == want, f"qemu-img convert {uri}: not the bytes written"
    assert sha256(copied) == want, f"nbdcopy {uri}: not the bytes written"

    def compare(path: Path, expect: int) -> None:
        clients.run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", os.fspath(path), uri, expect=expect
        )

    compare(copied, 0)
    for offset in (100 * CHUNK + 4321, 650 * CHUNK + 17):  # in data of v@1; in a hole of both
        with open(copied, "r+b") as f:
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(bytes([old[0] ^ 0x5A]))
        compare(copied, 1)
        with open(copied, "r+b") as f:
            f.seek(offset)
            f.write(old)
    compare(copied, 0)


def check_map(tool: str, extents: list[tuple[int, int, bool]], model: Model) -> None:
    """`extents` (offset, length, reads-as-zero) must tile the export, agree with the
    model's blocks, and never call zero a range that holds data."""
    pos = 0
    lies: list[str] = []
    wrong: dict[str, set[int]] = {"zero, expected data": set(), "data, expected zero": set()}
    for offset, length, zero in extents:
        assert offset == pos, f"{tool}: an extent at {offset}, expected one at {pos}"
        pos += length
        if zero and model.data[offset : offset + length].count(0) != length:
            lies.append(f"{offset}+{length}")
        for b in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
            if zero and model.blocks[b] == DATA:
                wrong["zero, expected data"].add(b * BLOCK // CHUNK)
            elif not zero and model.blocks[b] == ZERO:
                wrong["data, expected zero"].add(b * BLOCK // CHUNK)
    assert pos == len(model.data), f"{tool}: the extents end at {pos}, not {len(model.data)}"
    assert not lies, f"{tool}: reported as zero but holding data: {', '.join(lies)}"
    problems = [f"{what} in chunks {span(cs)}" for what, cs in wrong.items() if cs]
    assert not problems, f"{tool}: " + "; ".join(problems)


@EXPORTS
def test_qemu_img_map_and_nbdinfo_map_show_holes_and_data(
    export: str, service: Any, clients: Clients, rnd: random.Random
) -> None:
    model = build(service, clients, rnd).models[export]
    uri = clients.uri(export)
    command = f"qemu-img map --output=json -f raw {uri}"
    qemu = json.loads(clients.run(*command.split()).stdout)
    for e in qemu:
        assert e["zero"] or e["data"], f"{command}: neither zero nor data: {e}"
    check_map(command, [(e["start"], e["length"], e["zero"]) for e in qemu], model)

    command = f"nbdinfo --map --json {uri}"
    extents = json.loads(clients.run(*command.split()).stdout)
    for e in extents:  # HOLE (1) without ZERO (2) would be a hole reading as non-zero
        assert e["type"] in (0, 2, 3), f"{command}: {e}"
    check_map(command, [(e["offset"], e["length"], e["type"] & 2 != 0) for e in extents], model)


# --- nbdinfo -----------------------------------------------------------------------------


def dirty_chunks(clients: Clients, export: str, since: str) -> set[int]:
    """The chunks `nbdinfo --map=qemu:dirty-bitmap:SINCE` calls dirty on `export`."""
    argv = ("nbdinfo", f"--map=qemu:dirty-bitmap:{since}", "--json", clients.uri(export))
    extents = json.loads(clients.run(*argv).stdout)
    found: set[int] = set()
    pos = 0
    for e in extents:
        assert e["offset"] == pos and e["type"] in (0, 1), f"{' '.join(argv)}: {e}"
        pos += e["length"]
        if e["type"] == 1:
            assert e["offset"] % CHUNK == 0 and e["length"] % CHUNK == 0, f"{' '.join(argv)}: {e}"
            found.update(range(e["offset"] // CHUNK, (e["offset"] + e["length"]) // CHUNK))
    assert pos == SIZE, f"{' '.join(argv)}: the extents end at {pos}"
    return found


def test_dirty_bitmaps_show_exactly_the_chunks_changed_since_a_snapshot(
    service: Any, clients: Clients, rnd: random.Random
) -> None:
    scenario = build(service, clients, rnd)
    service.cli.run("create", "v")
    with handle(clients, "v") as h:
        apply(h, scenario.models["v"], PHASE_C, rnd)
    later = touched(PHASE_C)
    cases = [  # export, since, chunks expected dirty
        ("v", "v@1", scenario.dirty | later),
        ("v", "v@2", later),
        ("v@2", "v@1", scenario.dirty),
        ("v@1", "v@2", scenario.dirty),
        ("v@1", "v@1", set()),
    ]
    for export, since, want in cases:
        got = dirty_chunks(clients, export, since)
        assert got == want, (
            f"nbdinfo --map=qemu:dirty-bitmap:{since} {clients.uri(export)}: "
            f"dirty but unchanged: {span(got - want)}; changed but clean: {span(want - got)}"
        )
    info = json.loads(clients.run("nbdinfo", "--json", clients.uri("v@2")).stdout)
    (described,) = info["exports"]
    want_contexts = {"base:allocation", "qemu:dirty-bitmap:v@1", "qemu:dirty-bitmap:v@2"}
    assert set(described["contexts"]) == want_contexts, f"nbdinfo --json v@2: {described}"


CAN_ORIGIN = ["trim", "zero", "fast-zero", "fua", "flush", "multi-conn", "cache", "df", "write"]
FLAGS = {  # export -> {nbdinfo --can/--is FLAG: expected}
    "v": {**dict.fromkeys(CAN_ORIGIN, True), "read-only": False},
    "v@1": {
        **dict.fromkeys(["trim", "zero", "fast-zero", "write"], False),
        **dict.fromkeys(["flush", "multi-conn", "cache", "df", "read", "read-only"], True),
    },
}


@EXPORTS
def test_nbdinfo_lists_exports_flags_and_block_sizes(
    export: str, service: Any, clients: Clients
) -> None:
    cli = service.cli
    cli.run("volume", "create", "v", "--size", str(SIZE), "--sparse")
    cli.run("volume", "create", "w", "--size", "1M", "--sparse")
    for _ in range(2):
        cli.run("create", "v")
    cli.run("create", "w")
    listing = json.loads(clients.run("nbdinfo", "--list", "--json", clients.uri("")).stdout)
    names = sorted(e["export-name"] for e in listing["exports"])
    assert names == ["v", "v@1", "v@2", "w", "w@1"], f"nbdinfo --list: {names}"

    uri = clients.uri(export)
    for flag, want in FLAGS[export].items():
        option = "--is" if flag == "read-only" else "--can"
        clients.run("nbdinfo", option, flag, uri, expect=0 if want else 2)  # 2: false

    (info,) = json.loads(clients.run("nbdinfo", "--json", uri).stdout)["exports"]
    sizes = [info[f"block_size_{k}"] for k in ("minimum", "preferred", "maximum")]
    assert sizes[0] == 1 and sizes[2] == MAX_REQUEST, f"nbdinfo --json {uri}: {sizes}"
    assert 4096 <= sizes[1] <= MAX_REQUEST and sizes[1] & (sizes[1] - 1) == 0, sizes
    assert info["export-size"] == SIZE and info["is_read_only"] is (export != "v"), info


# --- qemu-io -----------------------------------------------------------------------------

QEMU_IO_SIZE = 16 * MiB
QEMU_IO_CHANGES = [  # (qemu-io command, offset, length, byte written or None for zeroes)
    ("write -P 0xb1 1M 64k", 1 * MiB, 64 * KiB, 0xB1),
    ("write -P 0xb2 1100k 3k", 1100 * KiB, 3 * KiB, 0xB2),
    ("discard 2M 256k", 2 * MiB, 256 * KiB, None),
    ("write -z 4M 128k", 4 * MiB, 128 * KiB, None),
    ("write -z -u 5M 192k", 5 * MiB, 192 * KiB, None),
    ("write -z 6148k 8k", 6148 * KiB, 8 * KiB, None),
]


def qemu_io_volume(service: Any, clients: Clients, short_tmp: Path) -> bytearray:
    """Volume v: 0xa1 in [0, 4M), 0xa2 in [4M, 8M), a hole after; snapshot v@1."""
    image = bytearray(b"\xa1" * 4 * MiB + b"\xa2" * 4 * MiB + bytes(8 * MiB))
    path = short_tmp / "patterns.img"
    path.write_bytes(image)
    service.cli.run("volume", "create", "v", "--size", str(QEMU_IO_SIZE), "--sparse")
    clients.run("nbdcopy", "--flush", os.fspath(path), clients.uri("v"))
    service.cli.run("create", "v")
    return image


def qemu_io(clients: Clients, export: str, *commands: str, readonly: bool = False) -> None:
    flags = ["-r"] if readonly else []
    argv = [a for c in commands for a in ("-c", c)]
    clients.run("qemu-io", *flags, "-f", "raw", *argv, clients.uri(export))


def test_qemu_io_writes_discards_and_zeroes_the_origin_not_the_snapshot(
    service: Any, clients: Clients, short_tmp: Path
) -> None:
    before = qemu_io_volume(service, clients, short_tmp)
    after = bytearray(before)
    reads = []
    for _, offset, length, byte in QEMU_IO_CHANGES:
        after[offset : offset + length] = bytes([byte or 0]) * length
        reads.append(f"read -P {byte or 0:#x} {offset} {length}")
    qemu_io(clients, "v", "read -P 0xa1 0 4M", "read -P 0xa2 4M 4M", "read -P 0 8M 8M")
    qemu_io(clients, "v", *(c for c, *_ in QEMU_IO_CHANGES), "flush", *reads)
    qemu_io(clients, "v", *reads, "read -P 0xa1 0 1M", "read -P 0xa2 7M 1M", readonly=True)

    got = clients.digest("v")
    changed = got.differing(clients.digest_of(after))
    assert not changed, f"nbdcopy {clients.uri('v')} -: chunks {span(changed)} differ"
    got = clients.digest("v@1")
    changed = got.differing(clients.digest_of(before))
    assert not changed, f"nbdcopy {clients.uri('v@1')} -: chunks {span(changed)} changed"
    qemu_io(clients, "v@1", "read -P 0xa1 1M 64k", "read -P 0xa1 2M 256k", readonly=True)
    qemu_io(clients, "v@1", "read -P 0xa2 4M 2M", "read -P 0 8M 8M", readonly=True)


def test_qemu_io_cannot_change_a_snapshot(service: Any, clients: Clients, short_tmp: Path) -> None:
    """qemu refuses these itself (the export says read-only); the nbdsh test sends them
    to the server, which must answer EPERM."""
    before = qemu_io_volume(service, clients, short_tmp)
    for command in ("write -P 0xcc 0 4k", "discard 0 64k", "write -z 0 64k", "write -z -u 0 1M"):
        clients.fails("qemu-io", "-f", "raw", "-c", command, clients.uri("v@1"))
    qemu_io(clients, "v@1", "read -P 0xa1 0 4M", "read -P 0 8M 8M", readonly=True)
    assert clients.digest("v@1") == clients.digest_of(before), "v@1 changed under qemu-io"


# --- nbdcopy -----------------------------------------------------------------------------


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_both_ways_and_between_exports(
    connections: int, service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    size = 32 * MiB
    image = short_tmp / "in.img"
    with open(image, "wb") as f:  # data in some MiBs, holes in the others
        f.truncate(size)
        for mib in sorted(rnd.sample(range(32), 12)):
            f.seek(mib * MiB)
            f.write(rnd.randbytes(MiB))
    model = bytearray(image.read_bytes())
    for name in ("v", "w"):
        service.cli.run("volume", "create", name, "--size", str(size), "--sparse")

    def nbdcopy(src: str, dst: str) -> None:
        clients.run("nbdcopy", "--flush", f"--connections={connections}", src, dst)

    nbdcopy(os.fspath(image), clients.uri("v"))
    service.cli.run("create", "v")
    qemu_io(clients, "v", "write -P 0xee 3M 2M", "discard 20M 1M")
    model[3 * MiB : 5 * MiB] = b"\xee" * 2 * MiB
    model[20 * MiB : 21 * MiB] = bytes(MiB)

    out = short_tmp / "out.img"
    nbdcopy(clients.uri("v@1"), os.fspath(out))
    assert sha256(out) == sha256(image), f"nbdcopy {clients.uri('v@1')} {out}: not the image"
    nbdcopy(clients.uri("v"), clients.uri("w"))
    changed = clients.digest("w").differing(clients.digest_of(model))
    assert not changed, f"nbdcopy {clients.uri('v')} {clients.uri('w')}: chunks {span(changed)}"
    clients.run("qemu-img", "compare", "-f", "raw", "-F", "raw", clients.uri("v"), clients.uri("w"))
    changed = clients.digest("v@1").differing(clients.digest_of(image.read_bytes()))
    assert not changed, f"nbdcopy {clients.uri('v@1')} -: chunks {span(changed)} changed"


# --- nbdsh -------------------------------------------------------------------------------

# Run by `nbdsh --opt-mode -u URI` after lines of constants (C, SIZE, SHA: the
# sha256 of the first 4 MiB of v@1). Exceptions (failed asserts) make nbdsh exit 1.
NBDSH_COMMON = """
import errno, hashlib
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:v@1")
h.set_strict_mode(0)  # requests libnbd would refuse locally reach the server
h.opt_go()

def status(length, offset):
    found = {}
    def extent(context, start, entries, err):
        runs, pos = [], start
        for n, flags in zip(entries[0::2], entries[1::2]):
            runs.append((pos, n, flags))
            pos += n
        found[context] = runs
    h.block_status(length, offset, extent)
    return found

def flags_at(context, length, offset):
    runs = status(length, offset)[context]
    assert runs and runs[0][0] == offset, runs
    return {f for _, _, f in runs}

def pieces(length, offset, flags=0):
    kinds = []
    def chunk(buf, start, kind, err):
        kinds.append(kind)
    data = h.pread_structured(length, offset, chunk, flags)
    return data, kinds

tail, kinds = pieces(C, SIZE - C)  # never written
assert tail == bytes(C) and nbd.READ_HOLE in kinds, kinds
assert flags_at(nbd.CONTEXT_BASE_ALLOCATION, 4 * C, SIZE - 4 * C) == {3}
assert h.pread(C, 3 * C, nbd.CMD_FLAG_DF) == h.pread(C, 3 * C)
h.cache(C, 0)
h.flush()
"""
NBDSH_ORIGIN = """
assert not h.is_read_only() and h.can_trim() and h.can_zero() and h.can_multi_conn()
assert hashlib.sha256(h.pread(64 * C, 0)).hexdigest() == SHA
pattern = bytes(range(256)) * (C // 256)
h.pwrite(pattern, 70 * C)  # a hole of v@1
assert h.pread(C, 70 * C) == pattern
h.pwrite(pattern[:1000], 2 * C + 123, nbd.CMD_FLAG_FUA)
assert h.pread(1000, 2 * C + 123) == pattern[:1000]
h.flush()
assert flags_at(nbd.CONTEXT_BASE_ALLOCATION, C, 70 * C) == {0}
h.trim(C, 0)
assert h.pread(C, 0) == bytes(C)
h.zero(2 * C, 8 * C)
h.zero(C, 12 * C, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(2 * C, 8 * C) == bytes(2 * C) and h.pread(C, 12 * C) == bytes(C)
try:
    h.zero(C, 13 * C, nbd.CMD_FLAG_FAST_ZERO)  # v@1 needs chunk 13: a preserve first
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
else:
    raise AssertionError("a FAST_ZERO that needs a preserve succeeded")
h.zero(C, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)  # chunk 0 is preserved already
h.flush()
dirty = set()
for start, n, f in status(80 * C, 0)["qemu:dirty-bitmap:v@1"]:
    if f & 1:
        dirty.update(range(start // C, (start + n) // C))
assert dirty == {0, 2, 8, 9, 12, 70}, sorted(dirty)
"""
NBDSH_SNAPSHOT = """
assert h.is_read_only() and not h.can_trim()
assert hashlib.sha256(h.pread(64 * C, 0)).hexdigest() == SHA
for refused in (
    lambda: h.pwrite(b"x" * 512, 0),
    lambda: h.pwrite(b"x" * 512, C + 7, nbd.CMD_FLAG_FUA),
    lambda: h.trim(C, 0),
    lambda: h.zero(C, 0),
):
    try:
        refused()
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
    else:
        raise AssertionError("the snapshot accepted a write")
assert hashlib.sha256(h.pread(64 * C, 0)).hexdigest() == SHA
assert flags_at("qemu:dirty-bitmap:v@1", SIZE, 0) == {0}
"""


def nbdsh(clients: Clients, export: str, script: Path) -> None:
    """`nbdsh --opt-mode -u URI -c` running `script` (a file, so that a failed assert's
    traceback shows its line). nbdsh runs `python3 -m nbd`: Debian's python3 is the one
    python3-libnbd is built for, hence /usr/bin first on PATH."""
    path = f"PATH=/usr/bin:{os.environ.get('PATH', '')}"
    run = f"exec(compile(open({os.fspath(script)!r}).read(), {os.fspath(script)!r}, 'exec'))"
    clients.run("env", path, "nbdsh", "--opt-mode", "-u", clients.uri(export), "-c", run)


@EXPORTS
def test_nbdsh_script_asserts_inside(
    export: str, service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    size = 16 * MiB
    image = short_tmp / "in.img"
    first = clients.random_file(image, 4 * MiB, rnd)
    service.cli.run("volume", "create", "v", "--size", str(size), "--sparse")
    clients.run("nbdcopy", "--flush", os.fspath(image), clients.uri("v"))
    service.cli.run("create", "v")
    constants = f"C = {CHUNK}\nSIZE = {size}\nSHA = {first!r}\n"
    script = short_tmp / f"nbdsh-{export}.py"
    script.write_text(
        constants + NBDSH_COMMON + (NBDSH_ORIGIN if export == "v" else NBDSH_SNAPSHOT)
    )
    nbdsh(clients, export, script)

    before = bytes(image.read_bytes()) + bytes(size - 4 * MiB)
    model = bytearray(before)
    if export == "v":
        pattern = bytes(range(256)) * (CHUNK // 256)
        model[70 * CHUNK : 71 * CHUNK] = pattern
        model[2 * CHUNK + 123 : 2 * CHUNK + 1123] = pattern[:1000]
        for offset, length in ((0, CHUNK), (8 * CHUNK, 2 * CHUNK), (12 * CHUNK, CHUNK)):
            model[offset : offset + length] = bytes(length)
    changed = clients.digest("v").differing(clients.digest_of(model))
    assert not changed, f"nbdcopy {clients.uri('v')} - after nbdsh: chunks {span(changed)}"
    changed = clients.digest("v@1").differing(clients.digest_of(before))
    assert not changed, f"nbdcopy {clients.uri('v@1')} - after nbdsh: chunks {span(changed)}"


# --- nbdfuse and a loop mount ------------------------------------------------------------


def unmount_fuse(mountpoint: Path) -> None:
    """`fusermount3 -u`, retried while busy: a loop device detaches asynchronously after
    the umount of its filesystem, and holds the FUSE file until then."""
    argv = ["fusermount3", "-u", os.fspath(mountpoint)]
    deadline = time.monotonic() + WAIT
    while (proc := subprocess.run(argv, capture_output=True, text=True, check=False)).returncode:
        busy = "busy" in proc.stderr.lower()
        assert busy and time.monotonic() < deadline, f"{' '.join(argv)}: {proc.stderr}"
        time.sleep(0.05)


@contextmanager
def nbdfuse(clients: Clients, export: str, mountpoint: Path, readonly: bool) -> Iterator[Path]:
    """`nbdfuse [-r] MOUNTPOINT/ URI` in the background: yields the file MOUNTPOINT/nbd;
    on a clean exit unmounts it (fusermount3 -u) and checks that nbdfuse exits 0."""
    mountpoint.mkdir()
    pidfile = mountpoint.with_name(mountpoint.name + ".pid")
    argv = ["nbdfuse", *(["-r"] if readonly else []), "-P", os.fspath(pidfile)]
    argv += [f"{mountpoint}/", clients.uri(export)]
    log = mountpoint.with_name(mountpoint.name + ".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        deadline = time.monotonic() + WAIT
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None, (
                f"{' '.join(argv)} exited {proc.returncode}: {log.read_text()}"
            )
            assert time.monotonic() < deadline, f"{' '.join(argv)}: not ready after {WAIT} s"
            time.sleep(0.02)
        yield mountpoint / "nbd"
        unmount_fuse(mountpoint)
        code = proc.wait(timeout=WAIT)
        assert code == 0, f"{' '.join(argv)} exited {code} after fusermount3 -u: {log.read_text()}"
    finally:
        if proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mountpoint)], check=False)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def loop_mount(clients: Clients, image: Path, target: Path, options: str) -> Iterator[Path]:
    """`mount -o loop,OPTIONS IMAGE TARGET`; unmounted (which detaches the loop) at the end."""
    target.mkdir(exist_ok=True)
    clients.run("mount", "-o", f"loop,{options}", os.fspath(image), os.fspath(target))
    try:
        yield target
    finally:
        if subprocess.run(["umount", os.fspath(target)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(target)], check=False)
            raise AssertionError(f"umount {target} failed (lazily unmounted instead)")


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def read_files(root: Path) -> dict[str, bytes]:
    return {
        os.fspath(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "lost+found" not in p.parts
    }


def test_ext4_made_through_nbdfuse_mounts_from_a_snapshot(
    service: Any, clients: Clients, short_tmp: Path, rnd: random.Random
) -> None:
    service.cli.run("volume", "create", "fs", "--size", str(SIZE), "--sparse")
    old = {"a.bin": rnd.randbytes(MiB), "notes.txt": b"first\n", "d/b.bin": rnd.randbytes(3 * MiB)}
    new = {"a.bin": rnd.randbytes(2 * MiB), "d/c.bin": rnd.randbytes(100 * KiB)}
    with nbdfuse(clients, "fs", short_tmp / "rw1", readonly=False) as file:
        clients.run("mkfs.ext4", "-q", "-F", os.fspath(file))
        with loop_mount(clients, file, short_tmp / "mnt", "rw") as root:
            write_files(root, old)
    service.cli.run("create", "fs")

    with (
        nbdfuse(clients, "fs", short_tmp / "rw2", readonly=False) as file,
        loop_mount(clients, file, short_tmp / "mnt", "rw") as root,
    ):
        write_files(root, new)  # the origin changes while the snapshot is read
        (root / "notes.txt").unlink()
        os.sync()
        with nbdfuse(clients, "fs@1", short_tmp / "ro", readonly=True) as snap:
            clients.run("e2fsck", "-fn", os.fspath(snap))
            with loop_mount(clients, snap, short_tmp / "snap", "ro") as snap_root:
                got = read_files(snap_root)
        assert read_files(root) == {"d/b.bin": old["d/b.bin"], **new}
    assert sorted(got) == sorted(old), f"files in fs@1: {sorted(got)}"
    for name, data in old.items():
        assert got[name] == data, f"fs@1:/{name} differs from what was written before the snapshot"
