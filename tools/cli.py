"""The `shadowblk` command line: global options, the command table, errors at the edge.

Every failure ends as one line on stderr, `shadowblk: CODE: MESSAGE`, and a non-zero exit:
the error's `exit_code` (3 when no service runs, 1 for the other errors of the service),
2 for a command line shadowblk cannot use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from shadowblk.provider.errors import ShadowblkError

from .commands import (
    bench,
    create,
    delete,
    list_cmd,
    mount,
    revert,
    run,
    serve,
    status,
    verify,
    volume,
)
from .commands.common import CliContext

DEFAULT_STATE_DIR = "/var/lib/shadowblk"
USAGE_EXIT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="SHADOWBLK_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    show_envvar=True,
    help="The service's state directory: catalog, sockets, default origins and diff areas.",
)
@click.pass_context
def cli(ctx: click.Context, state_dir: Path) -> None:
    """shadowblk: point-in-time snapshots of live block volumes (VSS for Linux)."""
    ctx.obj = CliContext(state_dir)


for command in (
    serve.serve, status.status, volume.volume, create.create, list_cmd.list_snapshots,
    delete.delete, revert.revert, run.run, mount.mount, mount.umount, verify.verify, bench.bench,
):
    cli.add_command(command)


def fail(code: str, message: str, exit_code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else code
    click.echo(f"shadowblk: {code}: {first}", err=True)
    sys.exit(exit_code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    try:
        rv = cli.main(args=argv, prog_name="shadowblk", standalone_mode=False)
    except ShadowblkError as exc:
        fail(exc.code, exc.message, exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        fail("usage", exc.format_message() + hint, USAGE_EXIT)
    except click.ClickException as exc:
        fail("error", exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("interrupted", "interrupted", 130)
    except OSError as exc:
        fail("os-error", str(exc), 1)
    except KeyboardInterrupt:
        fail("interrupted", "interrupted", 130)
    except Exception as exc:  # a bug: still one line (serve has logged the traceback)
        fail("internal", f"{type(exc).__name__}: {exc}", 1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
