"""`shadowblk mount NAME DIR` and `shadowblk umount DIR`: a snapshot's filesystem, read-only.

mount, in this process (never in the service, which serves the FUSE file the loop device
reads: a mount from there deadlocks):
1. `mount.prepare` asks the service for the file to attach: by default a new recovery
   overlay over the snapshot (a writable layer outside it, so the kernel can replay a dirty
   journal; mount/overlay.py), with --no-recover the snapshot's own read-only file;
2. a loop device over it (read-only without an overlay), its read-ahead raised;
3. the filesystem type from blkid; the options: `ro`, plus `nouuid` for xfs (the origin's
   filesystem may be mounted with the same UUID; btrfs gets a temporary fsid from the
   kernel by itself), plus, with --no-recover, `noload` (ext4), `norecovery` (xfs),
   `rescue=nologreplay` (btrfs), plus -o OPTIONS;
4. mount. On any failure, what was set up is undone, in reverse.

umount: unmounts DIR, detaches its loop device, and drops the overlay (which the service
also drops by itself when the loop device lets go of it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from shadowblk.mount import host

from .common import call, state_dir

READ_AHEAD_KB = 4096
RECOVER_OPTIONS = {"ext4": "noload", "ext3": "noload", "xfs": "norecovery",
                   "btrfs": "rescue=nologreplay"}  # fmt: skip
ALWAYS_OPTIONS = {"xfs": "nouuid"}


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.command()
@click.argument("name", metavar="NAME")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-recover", is_flag=True,
              help="Mount the snapshot as it is: skip journal replay (noload / norecovery / "
              "nologreplay) instead of replaying it into a temporary overlay.")
@click.option("-o", "options", metavar="OPTIONS", default="",
              help="More mount options, comma-separated (ro is always added).")  # fmt: skip
@click.pass_context
def mount(ctx: click.Context, name: str, directory: Path, no_recover: bool, options: str) -> None:
    """Mount snapshot NAME (VOLUME@N) read-only on DIR.

    Works while the origin's own filesystem is mounted on this host. By default a dirty
    journal (a snapshot taken under load is crash-consistent) is replayed into a temporary
    overlay held outside the snapshot and discarded at umount: the snapshot's bytes never
    change. The snapshot is pinned while mounted (delete says busy). Needs root and the
    service's FUSE front-end.
    """
    directory = directory.absolute()
    if not directory.is_dir():
        _fail(f"{directory} is not a directory")
    prepared = call(ctx, "mount.prepare", snapshot=name, recover=not no_recover)
    backing = prepared["file"]
    undo: list[list[str]] = []
    try:
        argv = ["losetup", "--find", "--show"] + (["--read-only"] if no_recover else [])
        device = host.run([*argv, "--", backing]).strip()
        undo.append(["losetup", "--detach", device])
        _raise_read_ahead(device)
        fstype = host.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device]).strip()
        if not fstype:
            _fail(f"{name}: no filesystem found")
        opts = ["ro", ALWAYS_OPTIONS.get(fstype, "")]
        if no_recover:
            opts.append(RECOVER_OPTIONS.get(fstype, ""))
        opts += options.split(",")
        host.run(["mount", "-t", fstype, "-o", ",".join(o for o in opts if o), device,
                  str(directory)])  # fmt: skip
    except (RuntimeError, click.ClickException) as exc:
        for argv in reversed(undo):
            try:
                host.run(argv)
            except RuntimeError as again:
                click.echo(f"shadowblk: cleanup: {again}", err=True)
        if not no_recover:
            call(ctx, "mount.release", file=backing)
        _fail(f"mount {name}: {exc}")
    click.echo(f"{name} mounted read-only on {directory} ({fstype}, {device})")


@click.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def umount(ctx: click.Context, directory: Path) -> None:
    """Unmount a snapshot mounted by `shadowblk mount`: the filesystem, then its loop
    device, then its recovery overlay."""
    target = str(directory.absolute())
    fuse_dir = state_dir(ctx) / "fuse"
    status = call(ctx, "status")
    fuse_dir = Path(status.get("listeners", {}).get("fuse") or fuse_dir)
    loop = next((lp for lp in host.loops_under(fuse_dir) if target in lp.mountpoints), None)
    if loop is None:
        _fail(f"{target}: no snapshot of this service is mounted there")
    assert loop is not None
    try:
        host.run(["umount", target])
        host.run(["losetup", "--detach", loop.device])
    except RuntimeError as exc:
        _fail(str(exc))
    if Path(loop.backing).name.startswith("."):
        call(ctx, "mount.release", file=loop.backing)
    click.echo(f"unmounted {target}")


def _raise_read_ahead(device: str) -> None:
    path = Path("/sys/block") / Path(device).name / "queue" / "read_ahead_kb"
    with contextlib.suppress(OSError):  # an optimisation only
        path.write_text(str(READ_AHEAD_KB))
