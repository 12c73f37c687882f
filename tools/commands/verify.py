"""`shadowblk verify [NAME]`: re-check every preserved chunk against its checksums."""

from __future__ import annotations

import sys
from typing import Any

import click

from shadowblk.tools.client import ControlClient

from .common import json_option, print_json, print_table, state_dir


@click.command()
@click.argument("name", required=False, metavar="[NAME]")
@json_option
@click.pass_context
def verify(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Re-read the preserved data of NAME (a volume or a snapshot VOLUME@N; default:
    everything) and check every 4 KiB block against its checksum.

    Damaged chunks are listed with the snapshots that read them and their offsets; those
    snapshots are marked damaged (their reads of those chunks fail with EIO, never wrong
    bytes). Exit status 0: no damage; 1: damage found. A progress bar shows on a terminal.
    """
    args: dict[str, Any] = {"name": name} if name else {}
    with ControlClient.connect(state_dir(ctx)) as client:
        if sys.stderr.isatty() and not as_json:
            result = _with_progress(client, args)
        else:
            result = client.call("verify", **args)
    damaged = result["damaged"]
    if as_json:
        print_json(result)
    elif damaged:
        rows = [[", ".join(d["snapshots"]) or "-", d["volume"], d["offset"], d["chunk"]]
                for d in damaged]  # fmt: skip
        print_table("damaged chunks", ("snapshots", "volume", "offset", "chunk"), rows)
    else:
        click.echo(f"checked {result['checked']} preserved chunks: no damage")
    if damaged:
        click.echo(f"shadowblk: damaged: {len(damaged)} damaged chunk(s)", err=True)
        sys.exit(1)


def _with_progress(client: ControlClient, args: dict[str, Any]) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("checking", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("verify", total=None)

        def on_event(message: dict[str, Any]) -> None:
            if message.get("event") == "verify.progress":
                data = message.get("data", {})
                bar.update(task, completed=data.get("done", 0), total=data.get("total"))

        return client.call("verify", on_event=on_event, progress=True, **args)
