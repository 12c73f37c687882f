"""What each control operation does: one handler per entry of `protocol.OPS`.

Handlers receive arguments already checked against the schema and call the engine; every
engine call blocks, so each runs in a worker thread through `OpContext.call` (snapshot
creation: `OpContext.call_now`). Handlers return JSON-ready values and let
`ShadowblkError`s through: the connection turns them into error replies.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from shadowblk.provider.api import HOLD_TIMEOUT, EngineAPI, SnapshotInfo
from shadowblk.provider.errors import (
    Busy,
    InvalidArgument,
    NotFound,
    NotSupported,
    ShadowblkError,
)

from . import protocol

log = logging.getLogger("shadowblk.control")

StatsSource = Callable[[], dict[str, Any]]
EventSink = Callable[[str, dict[str, Any]], None]
# the requesting connection's event sink, set by control.Connection around each handler
current_events: contextvars.ContextVar[EventSink | None] = contextvars.ContextVar(
    "current_events", default=None
)
# the requesting connection's auto-release snapshots, deleted when it closes (control.py)
current_releases: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "current_releases", default=None
)
# sends the requesting connection's reply from the thread doing its work (control.Wire); a
# handler that used it returns REPLIED
current_reply: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "current_reply", default=None
)
REPLIED = object()
PROGRESS_EVERY = 0.25  # seconds between two progress events


@dataclass
class OpContext:
    """What handlers may use: the engine, and facts about the service around it."""

    engine: EngineAPI
    service_info: StatsSource = dict
    stats_sources: Mapping[str, StatsSource] = field(default_factory=dict)
    fuse: Any = None  # the FUSE front-end (shadowblk.mount.frontend), None under --no-fuse
    nbd: Any = None  # the NBD server (for revert --force), None in tests of ops alone
    hold_timeout: float = HOLD_TIMEOUT  # seconds a set may hold writes (serve --hold-timeout)

    async def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run one blocking engine call in a worker thread."""
        return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))

    async def call_now(self, fn: Callable[[], Any]) -> Any:
        """`call`, for what a requester waits on under load (snapshot creation): `fn` runs
        in a thread of its own that starts at once.

        A trio worker thread starts only once the event loop's thread lets go of the GIL,
        and under an NBD write load that thread keeps it: 0.4-0.8 ms at the median and
        3-6 ms at p99 went by between the call and the worker's first step. Starting a
        thread (`Thread.start` waits for it to run) hands the GIL over: 0.17 / 0.8 ms.
        The call is waited for, shielded from cancellation as `call` is, so the
        connection's requests still run one after the other (and a connection has one
        such thread at most); it runs in a copy of the caller's context, as `call`'s."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        result: list[Any] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # re-raised in the task, as trio.to_thread does
                error.append(exc)
            finally:
                with contextlib.suppress(trio.RunFinishedError):  # cannot while we wait
                    token.run_sync_soon(done.set)

        context = contextvars.copy_context()
        name = getattr(fn, "__name__", "call")
        threading.Thread(target=context.run, args=(run,), name=name, daemon=True).start()
        with trio.CancelScope(shield=True):
            await done.wait()
        if error:
            raise error[0]
        return result[0]


Handler = Callable[[OpContext, dict[str, Any]], Awaitable[Any]]


async def op_status(ctx: OpContext, args: dict[str, Any]) -> Any:
    volumes = await ctx.call(ctx.engine.volumes)
    return {
        **ctx.service_info(),
        "volumes": [v.to_dict() for v in volumes],
        "snapshots": sum(v.snapshots for v in volumes),
        "diff_bytes": sum(v.diff_bytes for v in volumes),
    }


async def op_stats(ctx: OpContext, args: dict[str, Any]) -> Any:
    stats = {name: source() for name, source in ctx.stats_sources.items()}
    stats["engine"] = await ctx.call(ctx.engine.statistics)
    return stats


async def op_volume_create(ctx: OpContext, args: dict[str, Any]) -> Any:
    kwargs = dict(args)
    name = kwargs.pop("name")
    info = await ctx.call(ctx.engine.create_volume, name, **kwargs)
    return info.to_dict()


async def op_volume_set(ctx: OpContext, args: dict[str, Any]) -> Any:
    kwargs = dict(args)
    name = kwargs.pop("name")
    info = await ctx.call(ctx.engine.set_volume, name, **kwargs)
    return info.to_dict()


async def op_volume_list(ctx: OpContext, args: dict[str, Any]) -> Any:
    return [v.to_dict() for v in await ctx.call(ctx.engine.volumes)]


async def op_volume_remove(ctx: OpContext, args: dict[str, Any]) -> Any:
    await ctx.call(ctx.engine.remove_volume, args["name"])
    return {"removed": args["name"]}


async def op_snapshot_create(ctx: OpContext, args: dict[str, Any]) -> Any:
    auto_release = bool(args.get("auto_release"))
    releases = current_releases.get()
    if auto_release and releases is None:
        raise InvalidArgument("auto_release needs a control connection to tie the set to")
    reply = current_reply.get()

    def create() -> Any:  # in its own thread, replying from there (the requester waits)
        snaps: list[SnapshotInfo] = ctx.engine.create_snapshot_set(
            args["volumes"],
            label=args.get("label"),
            hold_timeout=ctx.hold_timeout,
            auto_release=auto_release,
        )
        if auto_release and releases is not None:  # before the reply: it may close at once
            releases.extend(s.name for s in snaps)
        result = {"set": snaps[0].set if snaps else None, "snapshots": [s.to_dict() for s in snaps]}
        if reply is None:
            return result
        reply(result)
        return REPLIED

    return await ctx.call_now(create)


async def op_snapshot_list(ctx: OpContext, args: dict[str, Any]) -> Any:
    snaps = await ctx.call(ctx.engine.snapshots, args.get("volume"))
    mounted = await _mounted(ctx)
    return [{**s.to_dict(), "mounted": mounted.get(s.name, [])} for s in snaps]


async def release_snapshots(ctx: OpContext, names: list[str], why: str) -> None:
    """Delete auto-release snapshots whose requester is gone. A mounted one is left (and
    logged): it goes at the next start, once nothing is mounted over it."""
    mounted = await _mounted(ctx)
    for name in names:
        if mounted.get(name):
            log.error("%s: %s is mounted on %s: kept until the next start", why, name,
                      ", ".join(mounted[name]))  # fmt: skip
            continue
        try:
            await ctx.call(ctx.engine.delete_snapshot, name, force=True)
            log.info("%s: released %s", why, name)
        except NotFound:
            pass
        except ShadowblkError as exc:
            log.error("%s: releasing %s: %s", why, name, exc)


async def _mounted(ctx: OpContext) -> dict[str, list[str]]:
    """Export name -> where filesystems over its FUSE file are mounted (mount/host.py)."""
    if ctx.fuse is None:
        return {}
    from shadowblk.mount.host import where_mounted

    mounted: dict[str, list[str]] = await ctx.call(where_mounted, ctx.fuse.fuse_dir)
    return mounted


def _fuse(ctx: OpContext) -> Any:
    if ctx.fuse is None:
        raise NotSupported("the service runs without its FUSE front-end (--no-fuse)")
    return ctx.fuse


async def op_mount_prepare(ctx: OpContext, args: dict[str, Any]) -> Any:
    """The FUSE file `shadowblk mount` attaches: the snapshot's, or a new recovery overlay
    over it."""
    fuse = _fuse(ctx)
    name = args["snapshot"]
    if "@" not in name:
        raise InvalidArgument(f"{name} is not a snapshot (VOLUME@N)")
    if not any(s.name == name for s in await ctx.call(ctx.engine.snapshots)):
        raise NotFound(f"no snapshot {name}")
    if args.get("recover", True):
        name = fuse.fs.create_overlay(name)
    return {"file": str(fuse.path_of(name))}


async def op_mount_release(ctx: OpContext, args: dict[str, Any]) -> Any:
    """Drop a recovery overlay (now, or at its last close if still open)."""
    fuse = _fuse(ctx)
    name = args["file"].rpartition("/")[2]
    return {"dropped": fuse.fs.drop_overlay(name)}


async def op_snapshot_delete(ctx: OpContext, args: dict[str, Any]) -> Any:
    force = bool(args.pop("force", False))
    if len(args) != 1:
        raise InvalidArgument("snapshot.delete: give exactly one of names, set, oldest")
    names = await ctx.call(_select_for_delete, ctx.engine, args)
    mounted = await _mounted(ctx)  # refused even with --force: it would fail under its user
    if mounted:
        for name in names:
            if mounted.get(name):
                raise Busy(f"snapshot {name} is mounted on {', '.join(mounted[name])}: "
                           "shadowblk umount it first")  # fmt: skip
    for done, name in enumerate(names):
        try:
            await ctx.call(ctx.engine.delete_snapshot, name, force=force)
        except ShadowblkError as exc:
            if done:  # say what did happen: the error alone would suggest nothing was deleted
                exc.message = f"deleted {', '.join(names[:done])}, then {name}: {exc.message}"
            raise
    return {"deleted": names}


def _select_for_delete(engine: EngineAPI, args: dict[str, Any]) -> list[str]:
    """The snapshot names a delete request means; NotFound before anything is deleted."""
    if "oldest" in args:
        snaps = engine.snapshots(args["oldest"])
        if not snaps:
            raise NotFound(f"volume {args['oldest']} has no snapshot")
        return [min(snaps, key=lambda s: s.seq).name]
    snaps = engine.snapshots()
    if "set" in args:
        members = [s.name for s in snaps if s.set == args["set"]]
        if not members:
            raise NotFound(f"no snapshot set {args['set']}")
        return members
    known = {s.name for s in snaps}
    missing = [n for n in args["names"] if n not in known]
    if missing:
        raise NotFound(f"no snapshot {', '.join(missing)}")
    return list(dict.fromkeys(args["names"]))


async def op_volume_revert(ctx: OpContext, args: dict[str, Any]) -> Any:
    """Revert a volume to a snapshot: refused while the origin's FUSE file is open (a
    mounted filesystem cannot be reverted under its feet) or N or a newer snapshot is
    mounted; NBD clients writing to the volume refuse it too, unless `force`, which
    disconnects them first."""
    name, force = args["snapshot"], bool(args.get("force"))
    volume, _, seq = name.rpartition("@")
    if not volume or not seq.isdigit():
        raise InvalidArgument(f"{name!r} is not a snapshot name (VOLUME@N)")
    if ctx.fuse is not None:
        if ctx.fuse.fs.opens_of(volume):
            raise Busy(f"the FUSE file of volume {volume} is open (a loop device, a mount "
                       "or a program): unmount or close it first")  # fmt: skip
        for other, points in (await _mounted(ctx)).items():
            v, _, n = other.rpartition("@")
            if v == volume and n.isdigit() and int(n) >= int(seq) and points:
                raise Busy(f"snapshot {other} is mounted on {', '.join(points)}: a revert "
                           f"to {name} would delete it; unmount it first")  # fmt: skip
    if ctx.nbd is not None:
        writers = ctx.nbd.writers_of(volume)
        if writers and not force:
            raise Busy(f"{writers} NBD client(s) have volume {volume} open: stop them, or "
                       "give --force to disconnect them")  # fmt: skip
        if writers:
            await ctx.nbd.disconnect_writers(volume)
    return await ctx.call(ctx.engine.revert, name, force=force)


async def op_fault_arm(ctx: OpContext, args: dict[str, Any]) -> Any:
    """Arm fault points (provider/faults.py syntax), or with `spec` "" disarm them all."""
    from shadowblk.provider import faults

    if not args["spec"]:
        faults.disarm()
    else:
        try:
            faults.arm(args["spec"])
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
    return {"armed": faults.armed(), "fired": list(faults.fired)}


async def op_verify(ctx: OpContext, args: dict[str, Any]) -> Any:
    """Re-check preserved data; with `progress`, `verify.progress` events {"done",
    "total"} go to the requesting connection while it runs."""
    sink = current_events.get() if args.get("progress") else None
    token = trio.lowlevel.current_trio_token()
    last = [0.0]

    def progress(done: int, total: int) -> None:  # in the worker thread
        now = time.monotonic()
        if sink is not None and (now - last[0] >= PROGRESS_EVERY or done == total):
            last[0] = now
            trio.from_thread.run_sync(
                sink, "verify.progress", {"done": done, "total": total}, trio_token=token
            )

    return await ctx.call(ctx.engine.verify, args.get("name"), progress)


HANDLERS: dict[str, Handler] = {
    "status": op_status,
    "stats": op_stats,
    "volume.create": op_volume_create,
    "volume.list": op_volume_list,
    "volume.set": op_volume_set,
    "volume.remove": op_volume_remove,
    "snapshot.create": op_snapshot_create,
    "snapshot.list": op_snapshot_list,
    "snapshot.delete": op_snapshot_delete,
    "mount.prepare": op_mount_prepare,
    "mount.release": op_mount_release,
    "verify": op_verify,
    "fault.arm": op_fault_arm,
    "volume.revert": op_volume_revert,
}

if set(HANDLERS) != set(protocol.OPS):  # the schema and the handlers are one table's halves
    raise ImportError(f"control ops without handler or schema: {set(HANDLERS) ^ set(protocol.OPS)}")
