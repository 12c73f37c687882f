"""`shadowblk bench [--quick] [--out DIR]`: shadowblk's figures beside its peers, in one run."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click
from rich.console import Console
from rich.markup import escape

SECTION_NAMES = ("passthrough", "cow", "snapcount", "oldsnap", "create", "memory", "fuse")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds the run: servers stopped, XFS unmounted, tmp removed


@click.command()
@click.option("--quick", is_flag=True,
              help="Every section at small sizes (under 2 minutes; what `make test` runs).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="bench-out",
              show_default=True, help="Directory for bench.md, bench.json, the PNG plots.")
@click.option("--only", multiple=True, type=click.Choice(SECTION_NAMES),
              help="Run only this section (repeatable); for working on one figure.")
def bench(quick: bool, out: Path, only: tuple[str, ...]) -> None:
    """Measure shadowblk beside nbdkit, qemu-nbd and nbdfuse, in one run, on this machine.

    fio --ioengine=nbd over Unix sockets, on the same image files; needs root (loop
    devices, an XFS mount for the 64 TiB volumes) and the peers `make setup` installs.
    It installs nothing. Does not use --state-dir: every service it starts has its own
    temporary state directory. See docs/benchmarks.md for what each figure means.
    """
    from ..bench import suite

    console = Console(highlight=False, soft_wrap=True)
    started = time.monotonic()

    def progress(line: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {escape(line)}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        code = suite.run(quick, out, progress, only)
    except suite.MissingTools as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)
