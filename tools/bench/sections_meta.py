"""The service sections: snapshot creation, memory and metadata, FUSE.

Control-plane figures are timed around `ControlClient.call` in this process (no CLI
start-up in them). The 64 TiB volumes live on the run's XFS filesystem (`images.
xfs_mount`), mounted once, at the first section that needs it, and unmounted at the end of
the run.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import fio, images, runner
from .core import Bench, GiB, TiB
from .sections import figure_of
from .volumes import CHUNK, adopted, build_chain, catalog_bytes, snapshot, volume_stats

CREATE_SIZES = (("1g", GiB), ("1t", TiB), ("64t", 64 * TiB))
CREATE_PACE = 0.01  # seconds between two creates, so the load runs between them too
LOAD_WARMUP = 0.5  # seconds of load before the first create
SMALL_CHUNK = 4096  # the memory section's chunk size: 1 M chunks in 4 GiB


def xfs(bench: Bench) -> Path:
    """The run's XFS mount point, mounted on first use and unmounted when the run ends."""
    if "xfs" not in bench.shared:
        bench.progress("  mounting a sparse XFS image (for 64 TiB volumes)")
        where = bench.workdir("xfs", shared=True)
        bench.shared["xfs"] = bench.stack.enter_context(images.xfs_mount(where))
    path: Path = bench.shared["xfs"]
    return path


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def _wait_connected(control: Any, load: fio.Background) -> None:
    """Until fio's connection is open (the `stats` op's nbd.connections_open), then
    `LOAD_WARMUP` more seconds of load."""
    deadline = time.monotonic() + 30
    while control.call("stats").get("nbd", {}).get("connections_open", 1) < 1:
        if not load.running() or time.monotonic() > deadline:
            load.stop()  # raises with fio's error
            raise RuntimeError("the fio load never connected")
        time.sleep(0.05)
    time.sleep(LOAD_WARMUP)
    if not load.running():
        load.stop()
        raise RuntimeError("the fio load ended before the creates")


def creation(bench: Bench) -> None:
    """Section 5: snapshot.create latency under a 4 KiB random-write load at depth 8."""
    count = bench.sizes.creates
    load_job = fio.Job("randwrite", "4k", 8, runtime=3600, extra=("--norandommap",))
    p50: list[float] = []
    p99: list[float] = []
    with runner.shadowblk(xfs(bench) / "create-state") as server, server.control() as control:
        for label, size in CREATE_SIZES:
            name = f"v{label}"
            control.call("volume.create", name=name, size=size, sparse=True)
            with fio.Background.nbd(server.uri(name), load_job) as load:
                _wait_connected(control, load)
                before = control.call("stats")["engine"]
                latencies = []
                for _ in range(count):
                    t0 = time.perf_counter()
                    snapshot(control, name)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    time.sleep(CREATE_PACE)
                after = control.call("stats")["engine"]
                result = load.stop()
            p50.append(percentile(latencies, 50))
            p99.append(percentile(latencies, 99))
            notes = (f"{count} creates at the control socket, sparse volume, under fio 4 KiB "
                     f"randwrite depth 8 ({result.iops:.0f} IOPS meanwhile)")  # fmt: skip
            bench.add(f"create.p50_ms.{label}", p50[-1], "ms", notes=notes)
            bench.add(f"create.p99_ms.{label}", p99[-1], "ms", notes=notes)
            history = after["create_phases_ms"][-count:]
            if len(history) != count:  # the engine keeps CREATE_HISTORY of them
                raise RuntimeError(f"the service reported {len(history)} of {count} creations")
            _service_side(bench, label, history, _preserved(before, after))
    bench.add("create.p99_64t_vs_1g", p99[-1] / p99[0], "×", notes="flat is 1.0")
    bench.series["create"] = {"sizes": [s for _, s in CREATE_SIZES],
                              "labels": [label for label, _ in CREATE_SIZES],
                              "p50_ms": p50, "p99_ms": p99}  # fmt: skip


def _preserved(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What the load preserved between two `stats`: chunks copied, and chunks that were
    holes (zero entries: nothing to copy or to fdatasync)."""
    chunks = after["chunks_preserved"] - before["chunks_preserved"]
    zeroes = after["zero_entries"] - before["zero_entries"]
    return f"{chunks - zeroes} chunks copied, {zeroes} holes preserved meanwhile"


def _service_side(bench: Bench, label: str, history: list[dict[str, float]], load: str) -> None:
    """The same creates timed inside the service (engine `create_phases_ms`): the total, and
    its steps in the notes, p50 / p99 each."""
    def both(phase: str) -> str:
        values = [h[phase] for h in history]
        return f"{percentile(values, 50):.2f} / {percentile(values, 99):.2f}"

    totals = [h["total"] for h in history]
    notes = (f"in the service, p50 / p99 ms: hold {both('hold')}, drain {both('drain')}, "
             f"sync {both('sync')} beside catalog {both('catalog')}, then commit "
             f"{both('commit')}; {load}")  # fmt: skip
    bench.add(f"create.service_p50_ms.{label}", percentile(totals, 50), "ms", notes=notes)
    bench.add(f"create.service_p99_ms.{label}", percentile(totals, 99), "ms", notes=notes)


def memory(bench: Bench) -> None:
    """Section 6: RSS idle with 64 TiB, RSS and catalog per preserved chunk, delete time."""
    with runner.shadowblk(xfs(bench) / "rss-state") as server, server.control() as control:
        time.sleep(0.5)
        bench.add("rss_mib.idle_empty", server.rss_mib(), "MiB", notes="no volume")
        control.call("volume.create", name="big", size=64 * TiB, sparse=True)
        time.sleep(1.0)
        bench.add("rss_mib.64t_idle", server.rss_mib(), "MiB",
                  notes="one 64 TiB sparse volume (64 KiB chunks), no I/O yet")  # fmt: skip
    _preserved_chunks(bench)
    _delete_oldest(bench)


def _preserved_chunks(bench: Bench) -> None:
    work, chunks = bench.workdir("memory"), bench.sizes.preserved_chunks
    image = images.fill(work / "chunks.img", chunks * SMALL_CHUNK)
    with adopted(work / "state", image, chunk_size=SMALL_CHUNK) as server, \
            server.control() as control:  # fmt: skip
        snapshot(control, server.export)
        entries0, rss0 = volume_stats(control, server.export)["entries"], server.rss_mib()
        catalog0 = catalog_bytes(server.state_dir)
        job = fio.Job("write", "1M", 4, end_fsync=True)
        result = fio.run(server.uri(), job)
        bench.progress(f"  preserving {chunks} chunks: {result.mib_s:.0f} MiB/s")
        entries = volume_stats(control, server.export)["entries"] - entries0
        rss = server.rss_mib()
        catalog = catalog_bytes(server.state_dir) - catalog0
    quick = "" if chunks == 1 << 20 else " (--quick: the full run uses 1048576)"
    notes = f"after {entries} preserved chunks of 4 KiB{quick}"
    bench.add("rss_mib.1m_chunks", rss, "MiB", notes=notes)
    bench.add("rss.bytes_per_chunk", (rss - rss0) * 2**20 / entries, "B", notes=notes)
    bench.add("catalog.bytes_per_chunk", catalog / entries, "B",
              notes=f"catalog.db + WAL after a checkpoint; {notes}")  # fmt: skip
    bench.add("cow.seqwrite.1m.4k_chunks", result.mib_s, "MiB/s",
              notes="the writes that preserved them: 1 MiB, depth 4, ends with a FLUSH")


def _delete_oldest(bench: Bench) -> None:
    work, sizes = bench.workdir("delete"), bench.sizes
    image = images.fill(work / "chain.img", sizes.chain_volume)
    volume_chunks = sizes.chain_volume // CHUNK
    rng = random.Random(5)
    oldest = rng.sample(range(volume_chunks), min(sizes.oldest_slice, volume_chunks))

    def slices(n: int) -> list[int]:  # written before snapshot n: n=2 follows the oldest
        return oldest if n == 2 else rng.sample(range(volume_chunks), 2)

    with adopted(work / "state", image) as server:
        build_chain(server, 512, slices)
        with server.control() as control:
            before = volume_stats(control, server.export)["entries"]
            t0 = time.perf_counter()
            control.call("snapshot.delete", oldest=server.export)
            elapsed = (time.perf_counter() - t0) * 1000
            freed = before - volume_stats(control, server.export)["entries"]
    bench.add("delete.oldest_of_512_ms", elapsed, "ms",
              notes=f"at the control socket; it freed {freed} preserved chunks")  # fmt: skip


FUSE_JOBS = ("seqread.1m", "randread.4k")


def fuse(bench: Bench) -> None:
    """Section 7: a snapshot read through its FUSE file against nbdfuse on its export."""
    work = bench.workdir("fuse")
    size = bench.sizes.chain_volume
    image = images.fill(work / "disk.img", size)
    jobs = {"seqread.1m": fio.Job("read", "1M", 1, size), "randread.4k": fio.Job(
        "randread", "4k", 1, size)}  # fmt: skip
    with adopted(work / "state", image) as server, server.control() as control:
        name = snapshot(control, server.export)
        fuse_file = server.state_dir / "fuse" / name
        if not fuse_file.exists():
            raise RuntimeError(f"the service shows no FUSE file {fuse_file}")
        ours = {k: fio.run_argv(fio.file_argv(fuse_file, j)) for k, j in jobs.items()}
        with nbdfuse(server.uri(name), work / "nbdfuse") as peer_file:
            peer = {k: fio.run_argv(fio.file_argv(peer_file, j)) for k, j in jobs.items()}
    for key in FUSE_JOBS:
        value, unit = figure_of(key, ours[key])
        bench.add(f"fuse.{key}", value, unit, "nbdfuse", figure_of(key, peer[key])[0],
                  notes="fio psync, one pass over the snapshot's file")  # fmt: skip


@contextmanager
def nbdfuse(uri: str, mountpoint: Path) -> Iterator[Path]:
    """`nbdfuse -r` of `uri` at `mountpoint`; unmounted and stopped on exit."""
    mountpoint.mkdir(exist_ok=True)
    pidfile = mountpoint.with_suffix(".pid")
    log = mountpoint.with_suffix(".log")
    argv = ["nbdfuse", "-r", "-P", os.fspath(pidfile), os.fspath(mountpoint), uri]
    with runner.running(argv, log) as process:
        deadline = time.monotonic() + runner.READY_TIMEOUT
        while not pidfile.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nbdfuse did not mount {uri}: {log.read_text()[-500:]}")
            time.sleep(0.05)
        try:
            yield mountpoint / "nbd"
        finally:
            runner.run_checked(["fusermount3", "-u", os.fspath(mountpoint)])

