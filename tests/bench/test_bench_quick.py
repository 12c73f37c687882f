"""`shadowblk bench --quick` runs every section and reports every figure the issue names.

One run (a module fixture), then checks on what it wrote: exit 0, bench.json parses, every
required figure is there and positive (its peer's too, where it has one), the FUSE figures
are measured or skipped with a reason, bench.md has a table per section, and the plots are
PNG files. Never a timing assertion: the figures are whatever this machine measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SHADOWBLK = Path(sys.executable).with_name("shadowblk")
RUN_TIMEOUT = 900.0  # a bound on a hung run, not a figure the test checks
pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

REQUIRED = (
    "passthrough.seqread.1m", "passthrough.seqwrite.1m", "passthrough.randread.4k.qd8",
    "passthrough.randwrite.4k.qd8", "cow.randwrite.4k", "cow.seqwrite.1m",
    "snapcount.randwrite.512_vs_1", "oldsnap.randread.oldest_vs_newest", "create.p99_ms.1g",
    "create.p99_ms.64t", "rss_mib.64t_idle", "catalog.bytes_per_chunk",
    "delete.oldest_of_512_ms",
)  # fmt: skip
WITH_PEER = ("passthrough.seqread.1m", "passthrough.randread.4k.qd8", "cow.randwrite.4k")
SECTION_TITLES = ("Passthrough", "Copy-on-write", "Snapshot count", "Old snapshots",
                  "Snapshot creation", "Memory and metadata", "FUSE")  # fmt: skip


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess[str]

    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out / "bench.json").read_text())
        return data

    def figures(self) -> dict[str, dict[str, Any]]:
        return {f["name"]: f for f in self.report()["figures"]}


@pytest.fixture(scope="module")
def quick_run() -> Iterator[Run]:
    if os.geteuid() != 0:
        pytest.skip("shadowblk bench needs root (loop devices, an XFS mount)")
    out = Path(tempfile.mkdtemp(prefix="sbk-bench-out-"))
    argv = [os.fspath(SHADOWBLK), "bench", "--quick", "--out", os.fspath(out)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        print(proc.stdout, proc.stderr, sep="\n")
        log = out / "bench.log"
        if log.exists():
            print(log.read_text())
        yield Run(out, proc)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_it_exits_0_with_no_failed_section(quick_run: Run) -> None:
    assert quick_run.proc.returncode == 0, quick_run.proc.stdout + quick_run.proc.stderr
    assert quick_run.report()["errors"] == []


def test_every_required_figure_is_present_and_positive(quick_run: Run) -> None:
    figures = quick_run.figures()
    missing = [name for name in REQUIRED if name not in figures]
    assert not missing, f"figures missing from bench.json: {missing}"
    for name in REQUIRED:
        assert figures[name]["value"] > 0, figures[name]
        assert figures[name]["unit"], figures[name]


def test_figures_with_a_peer_carry_its_value_and_the_ratio(quick_run: Run) -> None:
    for figure in quick_run.report()["figures"]:
        if figure["peer"] is None:
            assert figure["peer_value"] is None and figure["ratio"] is None, figure
        else:
            assert figure["peer_value"] > 0, figure
            assert figure["ratio"] == pytest.approx(
                figure["value"] / figure["peer_value"], rel=0.01, abs=0.001
            )
    figures = quick_run.figures()
    for name in WITH_PEER:
        assert figures[name]["peer"], figures[name]


def test_machine_facts_are_recorded(quick_run: Run) -> None:
    machine = quick_run.report()["machine"]
    for key in ("cpus", "cpu_model", "kernel", "python", "fio", "qemu_nbd", "nbdkit"):
        assert machine.get(key), f"machine.{key} missing: {machine}"


def test_fuse_is_measured_against_nbdfuse(quick_run: Run) -> None:
    figures = {f["name"]: f for f in quick_run.report()["figures"]}
    for name in ("fuse.seqread.1m", "fuse.randread.4k"):
        assert name in figures, f"{name} missing"
        assert figures[name]["peer"] == "nbdfuse" and figures[name]["peer_value"] > 0


def test_bench_md_has_a_table_per_section(quick_run: Run) -> None:
    text = (quick_run.out / "bench.md").read_text()
    for title in SECTION_TITLES:
        assert f". {title}" in text, f"no section {title!r} in bench.md"
    assert "| figure | value | unit | peer | peer value | ratio |" in text
    for name in REQUIRED:
        assert f"`{name}`" in text


def test_the_plots_are_png_files(quick_run: Run) -> None:
    for name in ("snapcount_iops.png", "create_latency.png"):
        data = (quick_run.out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
