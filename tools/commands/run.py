"""`shadowblk run VOLUME... -- COMMAND`: a command with an auto-release snapshot set."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from typing import Any

import click

from shadowblk.provider.errors import NotFound
from shadowblk.tools.client import ControlClient

from .common import state_dir


class _RunCommand(click.Command):
    """Everything after `--` is the command to run, never shadowblk's own arguments."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            raise click.UsageError("give the command after --: run VOLUME... -- COMMAND", ctx)
        split = args.index("--")
        ctx.meta["run.command"] = args[split + 1 :]
        return super().parse_args(ctx, args[:split])


def env_name(volume: str) -> str:
    return "SHADOWBLK_SNAPSHOT_" + re.sub(r"[^A-Za-z0-9]", "_", volume).upper()


@click.command(cls=_RunCommand)
@click.argument("volumes", nargs=-1, required=True, metavar="VOLUME...")
@click.option("--label", help="A label for the snapshot set.")
@click.pass_context
def run(ctx: click.Context, volumes: tuple[str, ...], label: str | None) -> None:
    """Take an auto-release snapshot set of VOLUME..., run COMMAND (after --), release.

    COMMAND sees the snapshots in its environment: SHADOWBLK_SNAPSHOTS (their names,
    space-separated), SHADOWBLK_SNAPSHOT_<VOLUME> (one per volume, upper case, other
    characters as _), SHADOWBLK_SET, SHADOWBLK_STATE_DIR. The set lives as long as this
    command: it is deleted when COMMAND ends, and by the service if this process dies
    (its control connection closes) or the service restarts. Exits with COMMAND's status.

    Example, an image of volume db as it was when the command started:

    \b
      shadowblk run db -- sh -c 'nbdcopy \
        "nbd+unix:///$SHADOWBLK_SNAPSHOT_DB?socket=$SHADOWBLK_STATE_DIR/nbd.sock" db.img'
    """
    command: list[str] = ctx.meta["run.command"]
    if not command:
        raise click.UsageError("no command after --")
    state = state_dir(ctx)
    with ControlClient.connect(state) as client:
        args: dict[str, Any] = {"volumes": list(volumes), "auto_release": True}
        if label is not None:
            args["label"] = label
        made = client.call("snapshot.create", **args)
        names = {s["volume"]: s["name"] for s in made["snapshots"]}
        env = dict(os.environ, SHADOWBLK_SET=made["set"], SHADOWBLK_STATE_DIR=str(state),
                   SHADOWBLK_SNAPSHOTS=" ".join(names.values()))  # fmt: skip
        env.update({env_name(volume): name for volume, name in names.items()})
        try:
            code = subprocess.call(command, env=env)
        except OSError as exc:
            click.echo(f"shadowblk: cannot run {command[0]}: {exc.strerror}", err=True)
            code = 127
        finally:
            with contextlib.suppress(NotFound):  # released already (a policy deleted it)
                client.call("snapshot.delete", set=made["set"], force=True)
    sys.exit(code)
