"""The I/O sections: passthrough, copy-on-write, snapshot count, old snapshots.

Every server of a section runs on the same image file (or, for qcow2, a copy converted
from it), one server at a time: they lock their images, and the two cores here are
better given to one server than shared. Write jobs end with a FLUSH counted in their time
(`end_fsync`): shadowblk acknowledges writes early and makes them durable at FLUSH, so a
write figure without it would flatter shadowblk.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from . import aio, fio, images, runner
from .core import Bench
from .volumes import BLOCK, CHUNK, adopted, build_chain, snapshot, volume_stats

PRIMARY_PEER = "qemu-nbd raw"
OTHER_PEERS = {"nbdkit file": "vs_nbdkit_file", "nbdkit python": "vs_nbdkit_python"}
SNAPSHOT_COUNTS = (1, 8, 64, 512)
SNAPCOUNT_RUNS = 4  # fio runs per count, right after snapshots N, N+1, ...: the figure is their
# mean, the counts taking turns in the order ABBA (1..512, 512..1, 512..1, 1..512), which
# balances out a drift of the machine over the section
OLD_CHAIN = 64
OLDSNAP_RUNS = 3  # fio runs per snapshot and job, oldest and newest taking turns


def _passthrough_jobs(bench: Bench) -> dict[str, fio.Job]:
    size, runtime = bench.sizes.image, bench.sizes.runtime
    return {
        "seqread.1m": fio.Job("read", "1M", 1, size, runtime),
        "seqwrite.1m": fio.Job("write", "1M", 1, size, runtime, end_fsync=True),
        "randread.4k.qd1": fio.Job("randread", "4k", 1, size, runtime),
        "randread.4k.qd8": fio.Job("randread", "4k", 8, size, runtime),
        "randwrite.4k.qd1": fio.Job("randwrite", "4k", 1, size, runtime, end_fsync=True),
        "randwrite.4k.qd8": fio.Job("randwrite", "4k", 8, size, runtime, end_fsync=True),
    }


def figure_of(key: str, result: fio.Result) -> tuple[float, str]:
    """Sequential jobs are judged by bandwidth, random ones by IOPS."""
    return (result.mib_s, "MiB/s") if key.startswith("seq") else (result.iops, "IOPS")


def passthrough(bench: Bench) -> None:
    """Section 1: no snapshots; shadowblk against three peers on one raw image."""
    work = bench.workdir("passthrough")
    image = images.fill(work / "disk.img", bench.sizes.image)
    starts: list[Callable[[], AbstractContextManager[runner.Server]]] = [
        lambda: adopted(work / "state", image),
        lambda: runner.nbdkit_file(image, work / "nbdkit-file.sock"),
        lambda: runner.qemu_nbd(image, work / "qemu-nbd.sock", "raw"),
        lambda: runner.nbdkit_python(image, work / "nbdkit-python.sock"),
    ]
    jobs = _passthrough_jobs(bench)
    results: dict[str, dict[str, fio.Result]] = {}
    for start in starts:
        with start() as server:
            for key, job in jobs.items():
                result = fio.run(server.uri(), job)
                results.setdefault(server.name, {})[key] = result
                value, unit = figure_of(key, result)
                bench.progress(f"  {server.name:14} {key:17} {value:10.1f} {unit}")
    ours = results["shadowblk"]
    for key in jobs:
        value, unit = figure_of(key, ours[key])
        notes = "fio --ioengine=nbd over a Unix socket; page cache for all servers"
        bench.add(f"passthrough.{key}", value, unit, PRIMARY_PEER,
                  figure_of(key, results[PRIMARY_PEER][key])[0], notes)  # fmt: skip
        for peer, suffix in OTHER_PEERS.items():
            bench.add(f"passthrough.{key}.{suffix}", value, unit, peer,
                      figure_of(key, results[peer][key])[0])  # fmt: skip


COW_KEYS = ("randwrite.4k", "seqwrite.1m")
COW_PEER = "qemu-nbd qcow2+snapshot"


def _cow_jobs(size: int) -> dict[str, Callable[[str], tuple[float, str]]]:
    """Each job: uri -> (figure, unit). The random first writes go through the libnbd
    driver (see aio.py for why not fio), the sequential ones through fio."""
    offsets = aio.first_write_offsets(size)
    seq = fio.Job("write", "1M", 1, size, end_fsync=True)
    return {
        "randwrite.4k": lambda uri: (aio.write_all(uri, offsets, depth=8).iops, "IOPS"),
        "seqwrite.1m": lambda uri: figure_of("seqwrite.1m", fio.run(uri, seq)),
    }


def cow(bench: Bench) -> None:
    """Section 2: first writes right after a snapshot; qemu-nbd on qcow2 with an internal
    snapshot under the same workload."""
    work = bench.workdir("cow")
    size = bench.sizes.image
    image = images.fill(work / "disk.img", size)
    qcow2 = images.qcow2_copy(image, work / "disk.qcow2", CHUNK)
    jobs = _cow_jobs(size)
    ours: dict[str, tuple[float, str]] = {}
    preserved: dict[str, tuple[int, int]] = {}
    with adopted(work / "state", image) as server, server.control() as control:
        for key in COW_KEYS:
            snapshot(control, server.export)
            before = volume_stats(control, server.export)["entries"]
            ours[key] = jobs[key](server.uri())
            entries, pending = settled_entries(control, server.export)
            preserved[key] = (entries - before, pending)
            bench.progress(f"  shadowblk {key}: {ours[key][0]:.1f} {ours[key][1]}")
    peer: dict[str, float] = {}
    for n, key in enumerate(COW_KEYS, 1):
        images.qcow2_snapshot(qcow2, f"s{n}")
        with runner.qemu_nbd(qcow2, work / "qemu-nbd.sock", "qcow2") as qemu:
            peer[key] = jobs[key](qemu.uri())[0]
        bench.progress(f"  qemu-nbd qcow2 {key}: {peer[key]:.1f}")
    notes = {
        "randwrite.4k": f"{size // CHUNK} writes (libnbd, depth 8), each the first to its "
        "64 KiB chunk (qcow2: cluster) since the snapshot, then a FLUSH",
        "seqwrite.1m": "fio: one pass over the image right after a snapshot; depth 1; "
        "then a FLUSH",
    }
    for key in COW_KEYS:
        count, pending = preserved[key]
        note = f"{notes[key]}; shadowblk preserved {count} chunks"
        if pending:
            note += (f" ({pending} still pending after the FLUSH: their writes durable in the "
                     "journal, the copies finished after)")
        bench.add(f"cow.{key}", *ours[key], COW_PEER, peer[key], note)


def settled_entries(control: Any, volume: str, timeout: float = 60) -> tuple[int, int]:
    """The volume's entries once no preserve is pending, and how many were pending at
    first (the jobs end with a FLUSH, which need not wait for the preserves of writes
    the journal holds)."""
    deadline = time.monotonic() + timeout
    stats = volume_stats(control, volume)
    pending = int(stats["pending"])
    while stats["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = volume_stats(control, volume)
    return int(stats["entries"]), pending


def _slices(volume_size: int, per_slice: int, seed: int) -> Callable[[int], list[int]]:
    rng = random.Random(seed)
    chunks = range(volume_size // CHUNK)
    return lambda n: rng.sample(chunks, per_slice)


def snapcount(bench: Bench) -> None:
    """Section 3: 4 KiB random-write IOPS with 1, 8, 64 and 512 snapshots.

    One volume per count, each on an image of its own, in one service: their chains are
    built first, then the counts are measured in turns, in ABBA order, so that no count is
    measured only early or only late in the section. Measured one after the other on one
    volume, the 1-snapshot runs came first and the 512 ones last, and the ratio moved with
    that order, not with the count (docs/benchmarks.md)."""
    work, sizes = bench.workdir("snapcount"), bench.sizes
    job = fio.Job("randwrite", "4k", 8, io_size=sizes.snapcount_ios * BLOCK, end_fsync=True)
    names = {n: f"s{n}" for n in SNAPSHOT_COUNTS}
    runs: dict[int, list[float]] = {n: [] for n in SNAPSHOT_COUNTS}
    room = max(SNAPSHOT_COUNTS) + SNAPCOUNT_RUNS - 1  # the runs past the last count
    with runner.shadowblk(work / "state", export=names[1]) as server:
        with server.control() as control:
            for n, name in names.items():
                image = images.fill(work / f"{name}.img", sizes.chain_volume, seed=n)
                control.call("volume.create", name=name, backing=os.fspath(image),
                             chunk_size=CHUNK)  # fmt: skip
                control.call("volume.set", name=name, max_snapshots=room)
        for n, name in names.items():
            bench.progress(f"  {name}: a chain of {n} snapshots")
            slices = _slices(sizes.chain_volume, sizes.chain_slice, seed=3)
            build_chain(server, n - 1, slices, name)  # the Nth comes right before its run
        with server.control() as control:
            for n in SNAPSHOT_COUNTS:  # a warm-up round, not counted: the first runs of
                fio.run(server.uri(names[n]), job)  # a section ran faster than the rest
            for r in range(SNAPCOUNT_RUNS):
                for n in SNAPSHOT_COUNTS if r % 4 in (0, 3) else SNAPSHOT_COUNTS[::-1]:
                    snapshot(control, names[n])  # the run's writes are first writes
                    os.sync()  # the chains' and the last run's writes, out of its way
                    runs[n].append(fio.run(server.uri(names[n]), job).iops)
                    bench.progress(f"  {n + r:3} snapshots: {runs[n][-1]:.0f} IOPS")
    iops = {n: statistics.mean(runs[n]) for n in SNAPSHOT_COUNTS}
    notes = (f"mean of {SNAPCOUNT_RUNS} runs, right after snapshots N to "
             f"N+{SNAPCOUNT_RUNS - 1}, of {sizes.snapcount_ios} writes (the same offsets each "
             f"time), one volume per count, taking turns in ABBA order; "
             f"{sizes.chain_slice} chunks written before each snapshot")  # fmt: skip
    for n in SNAPSHOT_COUNTS:
        bench.add(f"snapcount.randwrite.4k.{n}", iops[n], "IOPS", notes=notes)
    bench.add("snapcount.randwrite.512_vs_1", iops[512] / iops[1], "×",
              notes="IOPS with 512 snapshots ÷ IOPS with 1")  # fmt: skip
    bench.series["snapcount"] = {"snapshots": list(SNAPSHOT_COUNTS),
                                 "iops": [iops[n] for n in SNAPSHOT_COUNTS]}  # fmt: skip


def oldsnap(bench: Bench) -> None:
    """Section 4: reads of the oldest against the newest of 64 snapshots."""
    work, sizes = bench.workdir("oldsnap"), bench.sizes
    image = images.fill(work / "chain.img", sizes.chain_volume)
    chunks = sizes.chain_volume // CHUNK
    runtime = sizes.runtime / 2  # OLDSNAP_RUNS runs of each, alternating oldest and newest
    jobs = {
        "seqread.1m": fio.Job("read", "1M", 1, runtime=runtime),
        "randread.4k.qd8": fio.Job("randread", "4k", 8, runtime=runtime),
    }
    runs: dict[tuple[str, str], list[float]] = {}
    with adopted(work / "state", image) as server:
        build_chain(server, OLD_CHAIN, _slices(sizes.chain_volume, chunks // OLD_CHAIN, 4))
        with server.control() as control:
            changed = volume_stats(control, server.export)["changed_chunks"]
        for key, job in jobs.items():
            for _ in range(OLDSNAP_RUNS):
                for which, export in (("oldest", "vol@1"), ("newest", f"vol@{OLD_CHAIN}")):
                    value = figure_of(key, fio.run(server.uri(export), job))[0]
                    runs.setdefault((key, which), []).append(value)
                    bench.progress(f"  {export} {key}: {value:.1f}")
    got = {run: statistics.median(values) for run, values in runs.items()}
    share = (f"median of {OLDSNAP_RUNS} runs of each, alternating; {100 * changed / chunks:.0f} "
             f"% of the oldest's chunks are read from the diff area")  # fmt: skip
    for key in jobs:
        unit = figure_of(key, fio.Result(0, 0, 0, 0, 0))[1]
        for which in ("oldest", "newest"):
            bench.add(f"oldsnap.{key}.{which}", got[key, which], unit, notes=share)
        short = key.split(".")[0]
        bench.add(f"oldsnap.{short}.oldest_vs_newest", got[key, "oldest"] / got[key, "newest"],
                  "×", notes=f"{key}: oldest ÷ newest of {OLD_CHAIN} snapshots")  # fmt: skip
