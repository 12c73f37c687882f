"""`shadowblk create VOLUME...`: one snapshot set, atomic across its volumes."""

from __future__ import annotations

from typing import Any

import click

from .common import SNAPSHOT_COLUMNS, call, json_option, print_json, print_table, snapshot_rows


@click.command()
@click.argument("volumes", nargs=-1, required=True, metavar="VOLUME...")
@click.option("--label", help="A free-form label stored with each snapshot of the set.")
@json_option
@click.pass_context
def create(ctx: click.Context, volumes: tuple[str, ...], label: str | None, as_json: bool) -> None:
    """Snapshot VOLUME... as one set (all or none) and print its snapshots.

    Each snapshot is exported read-only over NBD as VOLUME@N.
    """
    args: dict[str, Any] = {"volumes": list(volumes)}
    if label is not None:
        args["label"] = label
    result = call(ctx, "snapshot.create", **args)
    if as_json:
        print_json(result)
        return
    print_table(f"snapshot set {result['set']}", SNAPSHOT_COLUMNS,
                snapshot_rows(result["snapshots"]))
