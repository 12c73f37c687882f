"""One bench run: check the tools, run the seven sections in order, write the report.

Everything a run starts or makes is registered on one ExitStack, closed whatever happens
(success, a failed section, Ctrl-C, SIGTERM): servers stopped (each section's own `with`
blocks first), the XFS filesystem unmounted and its loop device detached, the temporary
directory removed. A section that fails is recorded (bench.md, bench.json "errors", the
traceback in bench.log) and the run goes on with the next one; the exit status is then 1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from . import report, sections, sections_meta
from .core import FULL, QUICK, Bench

QUIET_SPAN = 0.5  # seconds without disk I/O that count as quiet
QUIET_LIMIT = 15.0  # seconds to wait for that, at most (2 under --quick: it must stay short)
QUICK_QUIET_LIMIT = 2.0

Section = Callable[[Bench], None]

SECTIONS: list[tuple[str, str, Section]] = [
    ("passthrough", "1. Passthrough (no snapshots)", sections.passthrough),
    ("cow", "2. Copy-on-write (first writes after a snapshot)", sections.cow),
    ("snapcount", "3. Snapshot count", sections.snapcount),
    ("oldsnap", "4. Old snapshots (oldest against newest of 64)", sections.oldsnap),
    ("create", "5. Snapshot creation latency", sections_meta.creation),
    ("memory", "6. Memory and metadata", sections_meta.memory),
    ("fuse", "7. FUSE", sections_meta.fuse),
]
TOOLS = ("fio", "nbdkit", "qemu-nbd", "qemu-img", "mkfs.xfs", "losetup", "mount", "umount")


class MissingTools(RuntimeError):
    pass


def check_tools() -> None:
    """The bench installs nothing: say what `make setup` should have installed."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise MissingTools(f"missing {', '.join(missing)} (run `make setup`)")


def _clean_up(bench: Bench) -> None:
    """Remove a section's files and let the disks settle, so the next section starts on a
    quiet machine: neither a page cache full of the last one's images nor its writeback
    (or, on a filesystem mounted with `discard`, the trims of its deleted files) running
    under the next one's fdatasyncs. Timed creation after the snapshot-count section, for
    one, had a p99 2 ms higher without it."""
    for path in bench.section_dirs:
        shutil.rmtree(path, ignore_errors=True)
    bench.section_dirs.clear()
    os.sync()
    quiet_disks(QUICK_QUIET_LIMIT if bench.sizes is QUICK else QUIET_LIMIT)


def quiet_disks(limit: float = QUIET_LIMIT) -> None:
    """Wait until no block device has I/O in flight or done in the last QUIET_SPAN seconds
    (at most `limit` seconds: a busy machine is then measured as it is)."""
    deadline = time.monotonic() + limit
    last = _disk_counters()
    while time.monotonic() < deadline:
        time.sleep(QUIET_SPAN)
        now = _disk_counters()
        if now == last and not any(inflight for _, inflight in now.values()):
            return
        last = now


def _disk_counters() -> dict[str, tuple[tuple[str, ...], int]]:
    """Per block device of /proc/diskstats: (its I/O counters, its I/O in flight)."""
    found = {}
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            found[fields[2]] = (tuple(fields[3:11]), int(fields[11]))
    return found


def run(quick: bool, out: Path, progress: Callable[[str], None],
        only: tuple[str, ...] = ()) -> int:  # fmt: skip
    """Run the bench; write bench.md, bench.json, the plots and bench.log into `out`.
    Exit status: 0 when every section ran, 1 when one failed."""
    check_tools()
    sizes = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    info = report.machine(sizes.mode)
    started = time.monotonic()
    errors: list[dict[str, str]] = []
    titles: dict[str, str] = {}
    log = out / "bench.log"
    log.write_text("")
    with ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="sbk-bench-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        bench = Bench(sizes, tmp, stack, progress)
        chosen = [s for s in SECTIONS if not only or s[0] in only]
        for index, (key, title, section) in enumerate(chosen, 1):
            titles[key] = title
            bench.section = key
            progress(f"[{index}/{len(chosen)}] {title}")
            t0 = time.monotonic()
            try:
                section(bench)
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                errors.append({"section": key, "error": message})
                with log.open("a") as f:
                    f.write(f"--- section {key} failed\n{traceback.format_exc()}\n")
                progress(f"  FAILED: {message} (traceback in {log})")
            _clean_up(bench)
            progress(f"  ({time.monotonic() - t0:.1f} s)")
        progress("cleaning up")
    info["duration_s"] = round(time.monotonic() - started, 1)
    written = report.write_all(bench, out, info, titles, errors)
    progress(f"done in {info['duration_s']} s: " + ", ".join(p.name for p in written))
    return 1 if errors else 0
