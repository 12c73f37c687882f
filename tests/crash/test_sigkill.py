"""Crash test: SIGKILL the service at random moments under a write load with snapshots.

A writer thread writes 4 KiB blocks through NBD; each block carries (sequence number, block
number), so any image tells which write each block holds. Meanwhile snapshots are created
and deleted over the control socket, and the service is killed with SIGKILL at a random
moment, then restarted, many times. Checked:

- each snapshot, when created, is a consistent cut: every block holds a write no older than
  the last one acknowledged before the create was requested, and none issued after the
  create returned;
- after every restart every snapshot whose creation was confirmed still exists and reads
  back the very bytes it read right after creation (I1, I3);
- the origin holds every write acknowledged before the last completed FLUSH (I2).

The load and the write model are crashload.py's (shared with the fault-point and
power-loss tests).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
from crashload import BLOCK, BLOCKS, Log, check_cut, decode, export_uri, read_export, writer

from shadowblk.tools.client import ControlClient

KILLS = int(os.environ.get("SHADOWBLK_CRASH_KILLS", "24"))


class Crasher:
    def __init__(self, service_factory: Any, state_dir: Path) -> None:
        self.factory = service_factory
        self.state_dir = state_dir
        self.log = Log()
        self.seqs = itertools.count(1)
        self.snapshots: dict[str, str] = {}  # name -> sha256 of its bytes at creation
        self.deleting: str | None = None
        self.service: Any = None
        self.rnd = random.Random(int(os.environ.get("SHADOWBLK_CRASH_SEED", time.time_ns())))

    def uri(self, export: str) -> str:
        return export_uri(self.state_dir, export)

    def start(self) -> None:
        self.service = self.factory(self.state_dir)
        self.log.started_at = self.log.now()
        self.log.incarnations.append(self.log.started_at)
        self.baseline = [0] * BLOCKS

    def read_baseline(self) -> None:
        self.baseline = decode(read_export(self.uri("v")))

    def round(self) -> None:
        """Load, snapshots, a kill at a random moment, a restart, the checks."""
        stop = threading.Event()
        thread = threading.Thread(
            target=writer,
            args=(self.uri("v"), self.log, self.seqs, stop, None, self.rnd.randrange(2**32)),
            daemon=True,
        )
        thread.start()
        self.killing = threading.Event()
        killer = threading.Timer(self.rnd.uniform(0.05, 0.6), self.kill)
        killer.start()
        try:
            self.snapshot_until_killed()
        finally:
            killer.join()
            stop.set()
            thread.join()
        self.start()
        self.verify()

    def kill(self) -> None:
        self.killing.set()
        self.service.kill()

    def snapshot_until_killed(self) -> None:
        try:
            with ControlClient.connect(self.state_dir, timeout=60) as client:
                while True:
                    self.one_operation(client)
        except (OSError, nbd.Error, EOFError) as e:
            if not self.killing.is_set():
                raise AssertionError(f"control/NBD failed while the service lived: {e}") from e
        except Exception:
            if not self.killing.is_set():
                raise

    def one_operation(self, client: ControlClient) -> None:
        time.sleep(self.rnd.uniform(0, 0.05))
        if len(self.snapshots) > 6 and self.rnd.random() < 0.5:
            name = self.rnd.choice(sorted(self.snapshots))
            self.deleting = name  # if the kill strikes now, it may or may not be gone
            client.call("snapshot.delete", names=[name])
            del self.snapshots[name]
            self.deleting = None
            return
        requested = self.log.now()
        result = client.call("snapshot.create", volumes=["v"])
        returned = self.log.now()
        name = result["snapshots"][0]["name"]
        image = read_export(self.uri(name))
        check_cut(decode(image), self.log, self.baseline, requested, returned, name)
        self.snapshots[name] = hashlib.sha256(image).hexdigest()

    def verify(self) -> None:
        listed = {s["name"] for s in self.service.cli.json("list")}
        if self.deleting is not None and self.deleting not in listed:
            del self.snapshots[self.deleting]
        self.deleting = None
        missing = set(self.snapshots) - listed
        assert not missing, f"snapshots lost in a crash: {sorted(missing)}"
        for name in listed - set(self.snapshots):  # created or deleted as the kill struck
            image = read_export(self.uri(name))
            decode(image)
            self.snapshots[name] = hashlib.sha256(image).hexdigest()
        for name, digest in self.snapshots.items():
            got = hashlib.sha256(read_export(self.uri(name))).hexdigest()
            assert got == digest, f"{name} changed across a crash"
        self.check_origin()
        self.read_baseline()

    def check_origin(self) -> None:
        origin = decode(read_export(self.uri("v")))
        starts = self.log.incarnations
        for seq, (block, issued, acked) in self.log.copy_writes().items():
            incarnation = max(s for s in starts if s < issued)
            if acked and acked < self.log.flushed_at.get(incarnation, 0):
                assert origin[block] >= seq, f"flushed write {seq} to block {block} was lost"


@pytest.mark.timeout(max(900, KILLS * 10))
def test_sigkill_under_load_keeps_every_snapshot(service_factory: Any, state_dir: Path) -> None:
    crasher = Crasher(service_factory, state_dir)
    crasher.start()
    crasher.service.cli.run("volume", "create", "v", "--size", str(BLOCKS * BLOCK))
    for _ in range(KILLS):
        crasher.round()
    assert len(crasher.snapshots) > 0
