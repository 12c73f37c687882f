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
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import pytest

from shadowblk.tools.client import ControlClient

BLOCK = 4096
BLOCKS = 1024  # a 4 MiB volume: 64 chunks of 64 KiB, so chunks are hit again and again
KILLS = int(os.environ.get("SHADOWBLK_CRASH_KILLS", "24"))


def block_image(seq: int, block: int) -> bytes:
    return struct.pack("<QQ", seq, block) * (BLOCK // 16)


def decode(image: bytes) -> list[int]:
    """The write sequence number each block holds (0: never written); checks placement."""
    seqs = []
    for b in range(BLOCKS):
        raw = image[b * BLOCK : (b + 1) * BLOCK]
        seq, block = struct.unpack_from("<QQ", raw)
        if raw != block_image(seq, block) or (seq and block != b):
            if raw == bytes(BLOCK):
                seqs.append(0)
                continue
            raise AssertionError(f"block {b} holds a torn or misplaced image (seq {seq}, {block})")
        seqs.append(seq)
    return seqs


@dataclass
class Log:
    """Every write and flush, stamped with a global event counter."""

    clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # seq -> (block, issued, acked)
    writes: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    started_at: int = 0  # event time of the service's last start
    incarnations: list[int] = field(default_factory=list)  # every started_at
    # flushes that completed, per service incarnation (its started_at): the latest start.
    # A write acknowledged before it survives; one acknowledged in an earlier incarnation
    # and never flushed there may have died in the overlay with that process.
    flushed_at: dict[int, int] = field(default_factory=dict)

    def now(self) -> int:
        with self.lock:
            return next(self.clock)

    def record(self, seq: int, write: tuple[int, int, int]) -> None:
        with self.lock:
            self.writes[seq] = write

    def copy_writes(self) -> dict[int, tuple[int, int, int]]:
        """A copy to walk while the writer thread goes on recording."""
        with self.lock:
            return dict(self.writes)


def writer(uri: str, log: Log, seqs: itertools.count[int], stop: threading.Event) -> None:
    """Write random blocks until the connection dies or `stop` is set."""
    h = nbd.NBD()
    rnd = random.Random()
    incarnation = log.started_at
    try:
        h.connect_uri(uri)
        n = 0
        while not stop.is_set():
            seq, block = next(seqs), rnd.randrange(BLOCKS)
            issued = log.now()
            log.record(seq, (block, issued, 0))
            h.pwrite(block_image(seq, block), block * BLOCK)
            log.record(seq, (block, issued, log.now()))
            n += 1
            if n % 50 == 0:
                start = log.now()
                h.flush()
                log.flushed_at[incarnation] = start
    except nbd.Error:
        return  # the service was killed under us
    finally:
        del h


def check_cut(
    seqs: list[int], log: Log, baseline: list[int], requested: int, returned: int, name: str
) -> None:
    """Every block of a snapshot holds a write consistent with when it was taken.

    `baseline` is the origin as the service found it at its last start (what survived the
    crash); writes acknowledged since then, before the create was requested, must be in.
    """
    latest_acked = dict(enumerate(baseline))
    writes = log.copy_writes()
    for seq, (block, issued, acked) in writes.items():
        if acked and acked < requested and issued > log.started_at:
            latest_acked[block] = max(latest_acked[block], seq)
    for b, seq in enumerate(seqs):
        assert seq >= latest_acked.get(b, 0), f"{name}: block {b} lost write {latest_acked[b]}"
        if seq:
            block, issued, _acked = writes[seq]
            assert issued < returned, f"{name}: block {b} holds write {seq}, issued after create"


def read_export(uri: str) -> bytes:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        return h.pread(BLOCKS * BLOCK, 0)
    finally:
        h.shutdown()


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
        return f"nbd+unix:///{export}?socket={self.state_dir / 'nbd.sock'}"

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
            target=writer, args=(self.uri("v"), self.log, self.seqs, stop), daemon=True
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
