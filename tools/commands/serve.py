"""`shadowblk serve`: run the service in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from shadowblk.provider.errors import ShadowblkError

from ..units import parse_size
from .common import state_dir

LOG_FORMAT = "%(asctime)s shadowblk[%(process)d] %(levelname)s %(name)s: %(message)s"


class InitVolumeType(click.ParamType):
    name = "NAME=SIZE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        name, sep, size = str(value).partition("=")
        if not sep or not name:
            self.fail(f"expected NAME=SIZE, got {value!r}", param, ctx)
        try:
            return name, parse_size(size)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option(
    "--init-volume",
    "init_volumes",
    type=InitVolumeType(),
    multiple=True,
    help="Create volume NAME of SIZE at start unless it exists (repeatable), e.g. demo=1G.",
)
@click.pass_context
def serve(ctx: click.Context, init_volumes: tuple[tuple[str, int], ...]) -> None:
    """Run the service in the foreground until SIGINT or SIGTERM.

    Serves NBD exports on STATE_DIR/nbd.sock (VOLUME read-write, VOLUME@N read-only) and
    the control API on STATE_DIR/control.sock, both mode 0600. Logs go to stderr.
    """
    import trio

    from ..service import Service, ServiceConfig

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    service = Service(ServiceConfig(state_dir(ctx), list(init_volumes)))
    try:
        trio.run(service.run)
    except (ShadowblkError, OSError):
        raise  # an error a person can act on: cli.main prints it in one line
    except Exception:
        logging.getLogger("shadowblk.service").exception("the service failed")
        raise
