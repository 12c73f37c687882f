"""`shadowblk list [VOLUME]`: snapshots."""

from __future__ import annotations

from typing import Any

import click

from .common import SNAPSHOT_COLUMNS, call, json_option, print_json, print_table, snapshot_rows


@click.command("list")
@click.argument("volume", required=False)
@json_option
@click.pass_context
def list_snapshots(ctx: click.Context, volume: str | None, as_json: bool) -> None:
    """List snapshots (of VOLUME only, if given): name, id, set, created, state, diff bytes."""
    args: dict[str, Any] = {"volume": volume} if volume else {}
    snapshots = call(ctx, "snapshot.list", **args)
    if as_json:
        print_json(snapshots)
        return
    print_table(None, SNAPSHOT_COLUMNS, snapshot_rows(snapshots))
