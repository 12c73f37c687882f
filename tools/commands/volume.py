"""`shadowblk volume create|list|remove`."""

from __future__ import annotations

import os
from typing import Any

import click

from ..protocol import FULL_POLICIES
from .common import DIFF_LIMIT, SIZE, call, json_option, print_json, print_table, size_or_dash


@click.group()
def volume() -> None:
    """Create, change, list and remove volumes."""


@volume.command("create")
@click.argument("name")
@click.option("--size", type=SIZE, help="Volume size: 4096, 64K, 1M, 1G, 15T... "
              "Required for a new volume; optional with --backing.")
@click.option("--backing", type=click.Path(dir_okay=False),
              help="Adopt this existing file or block device as the origin.")
@click.option("--chunk-size", type=SIZE, default="64K", show_default=True,
              help="Copy-on-write chunk: a power of two, 4K to 1M.")
@click.option("--diff-area", type=click.Path(file_okay=False),
              help="Directory for preserved data (default: in the state directory).")
@click.option("--max-diff", type=DIFF_LIMIT,
              help="Limit on preserved data: a size, or a percentage of the volume (10%) "
              "(default: the diff area's free space down to 5%).")
@click.option("--full-policy", type=click.Choice(FULL_POLICIES), default=FULL_POLICIES[0],
              show_default=True, help="What happens when the diff area is full.")
@click.option("--sparse", is_flag=True, help="Do not allocate a new origin file up front.")
@click.option("--max-snapshots", type=click.IntRange(1, 65536), default=None,
              help="Snapshots the volume may have at most (default 512, as VSS).")
@json_option
@click.pass_context
def create(ctx: click.Context, name: str, as_json: bool, **options: Any) -> None:
    """Create volume NAME: a new origin file, or adopt an existing file or block device."""
    if options["size"] is None and options["backing"] is None:
        raise click.UsageError("a new volume needs --size (or --backing to adopt a file)")
    for key in ("backing", "diff_area"):
        if options[key] is not None:
            options[key] = os.path.abspath(options[key])
    if not options["sparse"]:
        del options["sparse"]
    args = {key: value for key, value in options.items() if value is not None}
    info = call(ctx, "volume.create", name=name, **args)
    if as_json:
        print_json(info)
        return
    print_volumes([info])


@volume.command("set")
@click.argument("name")
@click.option("--max-diff", type=DIFF_LIMIT,
              help="New limit on preserved data: a size, a percentage of the volume (10%), "
              "or none (the diff area's free space down to 5%).")
@click.option("--full-policy", type=click.Choice(FULL_POLICIES),
              help="What happens when the diff area is full.")
@click.option("--max-snapshots", type=click.IntRange(1, 65536),
              help="Snapshots the volume may have at most.")
@json_option
@click.pass_context
def set_volume(ctx: click.Context, name: str, as_json: bool, **options: Any) -> None:
    """Change volume NAME's diff limit, full policy or snapshot limit."""
    args = {key: value for key, value in options.items() if value is not None}
    if args.get("max_diff") == "none":
        del args["max_diff"]
        args["no_max_diff"] = True
    if not args:
        raise click.UsageError("nothing to change: --max-diff, --full-policy, --max-snapshots")
    info = call(ctx, "volume.set", name=name, **args)
    if as_json:
        print_json(info)
        return
    print_volumes([info])


@volume.command("list")
@json_option
@click.pass_context
def list_volumes(ctx: click.Context, as_json: bool) -> None:
    """List volumes."""
    volumes = call(ctx, "volume.list")
    if as_json:
        print_json(volumes)
        return
    print_volumes(volumes)


@volume.command("remove")
@click.argument("name")
@click.pass_context
def remove(ctx: click.Context, name: str) -> None:
    """Remove volume NAME, which must have no snapshots and no NBD clients.

    An origin file shadowblk created is deleted with it; an adopted one (--backing) is left.
    """
    call(ctx, "volume.remove", name=name)
    click.echo(f"removed volume {name}")


def print_volumes(volumes: list[dict[str, Any]]) -> None:
    columns = ("name", "size", "chunk", "snapshots", "diff used", "max diff", "full policy",
               "origin")
    rows = [
        [v["name"], size_or_dash(v["size"]), size_or_dash(v["chunk_size"]),
         f"{v['snapshots']} of {v.get('max_snapshots', '-')}",
         size_or_dash(v["diff_bytes"]), size_or_dash(v["max_diff"]), v["full_policy"],
         v["origin"]]
        for v in volumes
    ]
    print_table(None, columns, rows)
