"""`shadowblk revert VOLUME@N [--force]`: roll a volume back to a snapshot."""

from __future__ import annotations

import click

from .common import call, json_option, print_json


@click.command()
@click.argument("name", metavar="VOLUME@N")
@click.option("--force", is_flag=True,
              help="Disconnect the NBD clients writing to the volume (and delete snapshots "
              "N and newer even if open) instead of refusing.")  # fmt: skip
@json_option
@click.pass_context
def revert(ctx: click.Context, name: str, force: bool, as_json: bool) -> None:
    """Roll volume VOLUME back to its snapshot N, copying back only the chunks changed since.

    Snapshot N and every newer snapshot of the volume are deleted (the origin no longer
    differs from N, and the newer ones record states that are gone); older snapshots stay
    intact. Refused while NBD clients have the volume open (unless --force, which
    disconnects them) and, always, while its FUSE file is open or loop-attached, or N or a
    newer snapshot is mounted. If the service dies midway, its next start finishes the
    revert before it serves anyone.
    """
    result = call(ctx, "volume.revert", snapshot=name, force=force)
    if as_json:
        print_json(result)
        return
    deleted = ", ".join(result["deleted"]) or "none"
    click.echo(f"{result['volume']} reverted to {result['snapshot']}: "
               f"{result['chunks']} chunk(s) copied back; deleted: {deleted}")  # fmt: skip
