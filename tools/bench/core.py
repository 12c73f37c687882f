"""What every section shares: the figures it records, the sizes it runs at, its context.

A section is a function `section(bench: Bench) -> None`. It starts what it needs through
`bench.stack` (an ExitStack closed when the whole run ends, on success, failure or Ctrl-C),
keeps its files under `bench.workdir(NAME)`, and records its results with `bench.add(...)`
(a figure) or `bench.skip(...)` (a figure it could not measure, with the reason). Series
for the plots go to `bench.series`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


@dataclass
class Figure:
    """One measured figure. `ratio` is value ÷ peer_value (for throughput and IOPS, higher
    is better); a figure without a peer carries None in peer, peer_value and ratio."""

    section: str
    name: str
    value: float
    unit: str
    peer: str | None = None
    peer_value: float | None = None
    notes: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer_value is None or self.peer_value == 0:
            return None
        return self.value / self.peer_value

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "name": self.name, "value": _round(self.value), "unit": self.unit,
            "peer": self.peer, "peer_value": _round(self.peer_value),
            "ratio": None if ratio is None else round(ratio, 3),
            "section": self.section, "notes": self.notes,
        }  # fmt: skip


@dataclass
class Skipped:
    section: str
    name: str
    reason: str


def format_value(value: float | None) -> str:
    """For people: 12,345 / 123.4 / 1.23."""
    if value is None:
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if value else "0"


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return round(value, 3) if abs(value) < 1000 else round(value, 1)


@dataclass(frozen=True)
class Sizes:
    """How big and how long each section runs: `QUICK` (make test) and `FULL`."""

    mode: str
    image: int  # passthrough and copy-on-write images
    runtime: float  # seconds per time-based fio job
    chain_volume: int  # snapshot-count and old-snapshot volumes (64 KiB chunks)
    chain_slice: int  # chunks written between two snapshots of the snapshot-count chain
    snapcount_ios: int  # 4 KiB writes measured at each snapshot count
    creates: int  # snapshot creations timed per volume size
    preserved_chunks: int  # the "1 M preserved chunks" of the memory section
    oldest_slice: int  # chunks only the oldest of 512 snapshots needs


QUICK = Sizes(
    mode="quick", image=256 * MiB, runtime=0.5, chain_volume=64 * MiB, chain_slice=4,
    snapcount_ios=2048, creates=40, preserved_chunks=32 * 1024, oldest_slice=128,
)  # fmt: skip
FULL = Sizes(
    mode="full", image=1 * GiB, runtime=8.0, chain_volume=256 * MiB, chain_slice=16,
    snapcount_ios=16384, creates=200, preserved_chunks=1 << 20, oldest_slice=1024,
)  # fmt: skip


@dataclass
class Bench:
    """The context handed to every section."""

    sizes: Sizes
    tmp: Path  # removed at the end of the run
    stack: ExitStack
    progress: Callable[[str], None]
    figures: list[Figure] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    section: str = ""
    shared: dict[str, Any] = field(default_factory=dict)  # resources sections share (XFS)
    section_dirs: list[Path] = field(default_factory=list)  # removed after the section

    def workdir(self, name: str, shared: bool = False) -> Path:
        """A directory under `tmp` for this section's files, removed when it ends
        (`shared`: kept until the end of the run, for the resources in `shared`)."""
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        if not shared and path not in self.section_dirs:
            self.section_dirs.append(path)
        return path

    def add(self, name: str, value: float, unit: str, peer: str | None = None,
            peer_value: float | None = None, notes: str = "") -> Figure:  # fmt: skip
        figure = Figure(self.section, name, value, unit, peer, peer_value, notes)
        self.figures.append(figure)
        ratio = "" if figure.ratio is None else f"  ×{figure.ratio:.2f} of {peer}"
        self.progress(f"  {name} = {format_value(value)} {unit}{ratio}")
        return figure

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append(Skipped(self.section, name, reason))
        self.progress(f"  {name}: skipped ({reason})")

    def to_json(self, machine: dict[str, Any]) -> dict[str, Any]:
        return {
            "machine": machine,
            "figures": [f.to_json() for f in self.figures],
            "skipped": [asdict(s) for s in self.skipped],
            "series": self.series,
        }
