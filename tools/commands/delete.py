"""`shadowblk delete NAME... | --set ID | --oldest VOLUME`."""

from __future__ import annotations

from typing import Any

import click

from .common import call, json_option, print_json


@click.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--set", "set_id", metavar="ID", help="Delete every snapshot of set ID.")
@click.option("--oldest", metavar="VOLUME", help="Delete the oldest snapshot of VOLUME.")
@click.option(
    "--force",
    is_flag=True,
    help="Delete even a snapshot in use (open by an NBD client or through its FUSE file); "
    "without it, busy. A mounted snapshot is refused even so.",
)
@json_option
@click.pass_context
def delete(
    ctx: click.Context,
    names: tuple[str, ...],
    set_id: str | None,
    oldest: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Delete snapshots by name (VOLUME@N), a whole set, or a volume's oldest snapshot.

    Names are checked first: if one does not exist, nothing is deleted. A snapshot in use
    (an NBD client or an open FUSE file) is refused with `busy` unless --force; a snapshot
    mounted with `shadowblk mount` is refused with `busy` until unmounted.
    """
    choices: list[tuple[str, Any]] = [
        ("names", list(names) or None), ("set", set_id), ("oldest", oldest)
    ]
    given = [(key, value) for key, value in choices if value is not None]
    if len(given) != 1:
        raise click.UsageError("give snapshot NAMEs, or --set ID, or --oldest VOLUME (one of them)")
    result = call(ctx, "snapshot.delete", **dict(given), **({"force": True} if force else {}))
    if as_json:
        print_json(result)
        return
    for name in result["deleted"]:
        click.echo(f"deleted {name}")
