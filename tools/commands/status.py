"""`shadowblk status`: is the service up? Its volumes, snapshot counts, diff usage, listeners."""

from __future__ import annotations

import click

from .common import call, json_option, print_json, print_table, size_or_dash


@click.command()
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds to wait for the service's answer.")
@json_option
@click.pass_context
def status(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """Show whether the service answers, its listeners, volumes and diff usage.

    Exit status: 0 when the service answers, 3 when no service runs on the state directory
    (no socket, or a stale one), 1 when it does not answer within --timeout seconds.
    """
    result = call(ctx, "status", timeout=timeout)
    if as_json:
        print_json(result)
        return
    service, listeners = result["service"], result["listeners"]
    click.echo(f"service: running, pid {service['pid']}, version {service['version']}, "
               f"since {service['started']}")
    click.echo(f"state directory: {service['state_dir']}")
    for name, where in listeners.items():
        click.echo(f"FUSE files: {where}" if name == "fuse" else f"{name} socket: {where}")
    rows = [
        [v["name"], size_or_dash(v["size"]), v["snapshots"], size_or_dash(v["diff_bytes"]),
         size_or_dash(v["max_diff"]), v["full_policy"], v.get("policy_victims", 0)]
        for v in result["volumes"]
    ]
    columns = ("volume", "size", "snapshots", "diff used", "max diff", "full policy",
               "dropped when full")  # fmt: skip
    print_table(None, columns, rows)
