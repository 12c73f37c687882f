"""`shadowblk serve`: run the service in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from shadowblk.provider.api import HOLD_TIMEOUT
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


class ListenType(click.ParamType):
    """HOST:PORT, or [IPV6]:PORT."""

    name = "HOST:PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        host, sep, port = str(value).rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(f"expected HOST:PORT (a port from 1 to 65535), got {value!r}", param, ctx)
        return host, int(port)


class Seconds(click.FloatRange):
    """A FloatRange of seconds that also refuses NaN (which compares false with both
    bounds, so a plain FloatRange lets it through to the engine)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


SCRUB_MAX = 365 * 86400.0  # a year: any finite interval the scrub thread can wait
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option(
    "--init-volume",
    "init_volumes",
    type=InitVolumeType(),
    multiple=True,
    help="Create volume NAME of SIZE at start unless it exists (repeatable), e.g. demo=1G.",
)
@click.option(
    "--nbd-listen",
    type=ListenType(),
    default=None,
    help="Also serve NBD on TCP at HOST:PORT (default: none). Plain text only on a "
    "loopback address; any other address needs --tls-cert and --tls-key.",
)
@click.option("--tls-cert", type=_FILE, default=None,
              help="PEM certificate chain of the TCP listener: TLS becomes required there.")
@click.option("--tls-key", type=_FILE, default=None,
              help="PEM private key of --tls-cert.")  # fmt: skip
@click.option("--fuse-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the FUSE files appear (default: STATE_DIR/fuse).")
@click.option("--scrub-interval", type=Seconds(min=1, max=SCRUB_MAX), default=None,
              metavar="SECONDS",
              help="Verify every preserved chunk in the background this often "
              "(default: never; `shadowblk verify` does it on demand).")
@click.option("--hold-timeout", type=Seconds(min=0, min_open=True, max=HOLD_TIMEOUT),
              default=HOLD_TIMEOUT, metavar="SECONDS", show_default=True,
              help="Longest time snapshot creation may hold writes to flush its volumes "
              f"(at most {HOLD_TIMEOUT:g}); past it, `create` fails with hold-timeout and "
              "writes resume.")
@click.option("--faults", metavar="SPEC", default=None,
              help="Arm fault points for testing: POINT=crash|eio|enospc|delay:MS[@N],... "
              "(docs/reliability.md).")
@click.option("--no-fuse", is_flag=True,
              help="No FUSE front-end (no files, no `shadowblk mount`).")  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context,
    init_volumes: tuple[tuple[str, int], ...],
    nbd_listen: tuple[str, int] | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    fuse_dir: Path | None,
    scrub_interval: float | None,
    hold_timeout: float,
    faults: str | None,
    no_fuse: bool,
) -> None:
    """Run the service in the foreground until SIGINT or SIGTERM.

    Serves NBD exports on STATE_DIR/nbd.sock (VOLUME read-write, VOLUME@N read-only) and
    the control API on STATE_DIR/control.sock, both mode 0600, and NBD on TCP with
    --nbd-listen (NBD_OPT_STARTTLS required when --tls-cert is given). The same exports
    are files in STATE_DIR/fuse (VOLUME read-write, VOLUME@N read-only): `mount -o loop`
    them, or `shadowblk mount` a snapshot. Logs go to stderr.
    """
    import trio

    from ..service import Service, ServiceConfig

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert is not None and nbd_listen is None:
        raise click.UsageError("--tls-cert applies to the TCP listener: give --nbd-listen too")
    if faults:
        from shadowblk.provider import faults as fault_points

        try:
            fault_points.arm(faults)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--faults") from None
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    config = ServiceConfig(
        state_dir(ctx), list(init_volumes), nbd_listen, tls_cert, tls_key, not no_fuse, fuse_dir,
        scrub_interval, hold_timeout,
    )
    service = Service(config)
    try:
        trio.run(service.run)
    except (ShadowblkError, OSError):
        raise  # an error a person can act on: cli.main prints it in one line
    except Exception:
        logging.getLogger("shadowblk.service").exception("the service failed")
        raise
