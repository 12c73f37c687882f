"""The FUSE front-end's lifetime inside `serve`: clean up, mount, serve, tear down in order.

Start: whatever a killed service left over the FUSE directory is cleared first
(filesystems on loop devices over its files are lazily unmounted, the loop devices
detached, the dead FUSE mount unmounted), then the directory is mounted.

Stop (the service is cancelled): while FUSE still answers, the filesystems mounted over its
files are unmounted (a plain umount first, so their dirty data reaches the engine; lazily
if busy) and their loop devices detached; only then does FUSE stop and unmount. The other
order hangs those umounts on a FUSE that no longer answers.

Commands run in child processes (`trio.run_process`), never blocking the trio thread that
serves FUSE.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import pyfuse3
import trio

from shadowblk.provider.api import EngineAPI

from . import host
from .fusefs import ShadowFS

log = logging.getLogger("shadowblk.fuse")

PR_SET_IO_FLUSHER = 57


def mark_io_flusher() -> None:
    """PR_SET_IO_FLUSHER: this process serves I/O for the kernel (a loop device over a
    FUSE file); memory reclaim must not wait on it. Logged, not fatal, when refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.warning("PR_SET_IO_FLUSHER refused (%s; it needs CAP_SYS_RESOURCE): memory "
                    "reclaim may wait on this process's FUSE I/O", os.strerror(err))  # fmt: skip


async def _run(argv: list[str]) -> bool:
    result = await trio.run_process(argv, check=False, capture_stdout=True, capture_stderr=True)
    if result.returncode != 0:
        log.warning("%s: %s", " ".join(argv), result.stderr.decode(errors="replace").strip())
    return result.returncode == 0


async def clean_stale(fuse_dir: Path) -> None:
    """Clear what a dead service left: lazy unmounts, loop detaches, the FUSE unmount."""
    for argv in await trio.to_thread.run_sync(host.cleanup_commands, fuse_dir):
        log.warning("cleaning up after a previous service: %s", " ".join(argv))
        await _run(argv)


class FuseFrontend:
    def __init__(self, engine: EngineAPI, fuse_dir: Path, store_dir: Path) -> None:
        self.fuse_dir = fuse_dir
        self.fs = ShadowFS(engine, store_dir)

    def path_of(self, name: str) -> Path:
        return self.fuse_dir / name

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await clean_stale(self.fuse_dir)
        self.fuse_dir.mkdir(mode=0o755, exist_ok=True)
        options = set(pyfuse3.default_options)
        options |= {"fsname=shadowblk", "subtype=shadowblk", "allow_other"}
        pyfuse3.init(self.fs, str(self.fuse_dir), options)
        log.info("FUSE files at %s", self.fuse_dir)
        main_scope = trio.CancelScope(shield=True)  # FUSE serves until the mounts are gone

        async def main() -> None:
            with main_scope:
                await pyfuse3.main()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(main)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._unmount_users()
                        main_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            self.fs.close()
            log.info("FUSE unmounted")

    async def _unmount_users(self) -> None:
        for loop in await trio.to_thread.run_sync(host.loops_under, self.fuse_dir):
            for mountpoint in loop.mountpoints:
                log.warning("unmounting %s (on %s) before FUSE stops", mountpoint, loop.device)
                if not await _run(["umount", mountpoint]):
                    await _run(["umount", "--lazy", mountpoint])
            await _run(["losetup", "--detach", loop.device])
