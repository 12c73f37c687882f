"""The outputs of a run: bench.json, bench.md and the PNG plots, plus the machine's facts.

bench.json: {"machine": {...}, "figures": [{"name", "value", "unit", "peer", "peer_value",
"ratio", "section", "notes"}], "skipped": [{"section", "name", "reason"}], "errors": [...],
"series": {...}}. bench.md: one table per section, in the order the sections ran.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .core import Bench, Figure, GiB, format_value

SNAPCOUNT_PNG = "snapcount_iops.png"
CREATE_PNG = "create_latency.png"
COLUMNS = ("figure", "value", "unit", "peer", "peer value", "ratio", "notes")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "missing"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _shadowblk_version() -> str:
    try:
        version = metadata.version("shadowblk")
    except metadata.PackageNotFoundError:
        version = "unknown"
    source = Path(__file__).resolve().parents[2]
    commit = _version(["git", "-C", os.fspath(source), "describe", "--always", "--dirty"])
    return f"{version} ({commit})" if commit not in ("missing", "unknown") else version


def machine(mode: str) -> dict[str, Any]:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(memory / GiB, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "shadowblk": _shadowblk_version(),
        "fio": _version(["fio", "--version"]),
        "qemu_nbd": _version(["qemu-nbd", "--version"]),
        "nbdkit": _version(["nbdkit", "--version"]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def write_all(bench: Bench, out: Path, info: dict[str, Any], titles: dict[str, str],
              errors: list[dict[str, str]]) -> list[Path]:  # fmt: skip
    """Write every output into `out`; the paths written."""
    data = bench.to_json(info)
    data["errors"] = errors
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    plots = plot(bench.series, out)
    paths[1].write_text(markdown(bench, info, titles, errors, [p.name for p in plots]))
    return paths + plots


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _figure_row(f: Figure) -> str:
    ratio = f.ratio
    return _row([f"`{f.name}`", format_value(f.value), f.unit, f.peer or "",
                 format_value(f.peer_value), "" if ratio is None else f"{ratio:.2f}",
                 f.notes])  # fmt: skip


def markdown(bench: Bench, info: dict[str, Any], titles: dict[str, str],
             errors: list[dict[str, str]], plots: list[str]) -> str:  # fmt: skip
    lines = [f"# shadowblk bench ({info['mode']}), {info['date']}", ""]
    lines += [f"- {key}: {value}" for key, value in info.items() if key not in ("date", "mode")]
    lines += ["", "ratio = shadowblk ÷ peer (throughput and IOPS: higher is better).", ""]
    for section, title in titles.items():
        lines += [f"## {title}", "", _row(list(COLUMNS)), _row(["---"] * len(COLUMNS))]
        lines += [_figure_row(f) for f in bench.figures if f.section == section]
        lines += [_row([f"`{s.name}`", f"skipped: {s.reason}", "", "", "", "", ""])
                  for s in bench.skipped if s.section == section]  # fmt: skip
        lines += [_row([section, f"failed: {e['error']}", "", "", "", "", ""])
                  for e in errors if e["section"] == section]  # fmt: skip
        lines.append("")
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines).rstrip() + "\n"


def plot(series: dict[str, Any], out: Path) -> list[Path]:
    """The two plots, for the series the run produced."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    if "snapcount" in series:
        s = series["snapcount"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(s["snapshots"], s["iops"], marker="o")
        ax.set(xscale="log", xlabel="snapshots of the volume", ylabel="4 KiB random-write IOPS",
               title="Write IOPS against snapshot count", ylim=(0, None))  # fmt: skip
        ax.set_xticks(s["snapshots"], [str(n) for n in s["snapshots"]])
        ax.minorticks_off()
        written.append(_save(fig, out / SNAPCOUNT_PNG))
    if "create" in series:
        s = series["create"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(s["sizes"], s["p50_ms"], marker="o", label="p50")
        ax.plot(s["sizes"], s["p99_ms"], marker="s", label="p99")
        ax.set(xscale="log", xlabel="volume size", ylabel="snapshot.create latency (ms)",
               title="Snapshot creation under 4 KiB random writes, depth 8",
               ylim=(0, None))  # fmt: skip
        ax.set_xticks(s["sizes"], [_size_label(label) for label in s["labels"]])
        ax.minorticks_off()
        ax.legend()
        written.append(_save(fig, out / CREATE_PNG))
    return written


def _size_label(label: str) -> str:
    return f"{label[:-1]} {label[-1].upper()}iB"


def _save(fig: Any, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
