"""Power loss: a real service on a recorded disk, then its crash states replayed and checked.

Design note

1. Record (powerdisk.RecordedDisk): the whole state directory (catalog, diff areas,
   origins) lives on an ext4 over a loop device over the recorder's FUSE file, which logs
   every block write and every flush, SQLite's and the kernel's included.
2. Load (PowerLoad): `shadowblk serve` with two volumes; crashload's writer on each
   (stamped 4 KiB blocks over NBD, a FLUSH every 50 writes); meanwhile snapshot sets (both
   volumes, or one) are created and single members deleted over the control socket. Each
   promise is stamped with the recorder's event count (powercheck.Expectations); each
   snapshot is read over NBD right after its creation (its bytes, and a consistent cut).
3. Replay (replay.py): STATES crash states, every FLUSH after the load began (sampled if
   more than half of STATES) plus seeded random subsets of the writes after a FLUSH; each is
   materialised, mounted (ext4 replays its journal) and checked (powercheck.check_state:
   the engine opens in this process; I1-I3).
A failure names the state and the seed; SHADOWBLK_KEEP_FAILED=DIR keeps the failing images.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import nbd
import pytest
from crashload import BLOCK, BLOCKS, check_cut, decode, export_uri, read_export, writer
from powercheck import (
    Expectations,
    SetRecord,
    SnapshotRecord,
    VolumeRecord,
    check_crash_state,
)
from powerdisk import RecordedDisk, missing_host_support
from replay import CrashState, Materialiser, choose_states, flush_points, read_log

from shadowblk.tools.client import ControlClient

STATES = int(os.environ.get("SHADOWBLK_POWERLOSS_STATES", "320"))
OPERATIONS = max(40, STATES // 8)  # snapshot creates and deletes during the recorded load
SEED = int(os.environ.get("SHADOWBLK_CRASH_SEED", str(time.time_ns() % 2**32)))
DISK_SIZE = 128 << 20  # room for LIVE_SNAPSHOTS of each volume, all chunks changed
LIVE_SNAPSHOTS = 5  # per volume, about: more, and the full policy would delete some
VOLUMES = ("v", "w")
MAX_FAILED_STATES = 5  # after this many failing states, stop and report


class PowerLoad:
    """The recorded run; fills `exp` with what it promised."""

    def __init__(self, disk: RecordedDisk, state_dir: Path, rnd: random.Random) -> None:
        self.disk = disk
        self.state_dir = state_dir
        self.rnd = rnd
        self.exp = Expectations({v: VolumeRecord() for v in VOLUMES})
        self.seqs = itertools.count(1)

    def uri(self, export: str) -> str:
        return export_uri(self.state_dir, export)

    def run(self, operations: int) -> None:
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=writer,
                args=(self.uri(v), rec.log, self.seqs, stop, partial(self._flushed, rec),
                      self.rnd.randrange(2**32)),  # fmt: skip
                daemon=True,
            )
            for v, rec in self.exp.volumes.items()
        ]
        for t in threads:
            t.start()
        try:
            with ControlClient.connect(self.state_dir, timeout=60) as client:
                for _ in range(operations):
                    self.one_operation(client)
        finally:
            stop.set()
            for t in threads:
                t.join()
        for v in VOLUMES:
            self.final_flush(v)

    def _flushed(self, rec: VolumeRecord, start: int) -> None:
        rec.flushes.append((start, self.disk.events()))

    def final_flush(self, volume: str) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri(volume))
        try:
            rec = self.exp.volumes[volume]
            start = rec.log.now()
            h.flush()
            self._flushed(rec, start)
        finally:
            h.shutdown()

    def one_operation(self, client: ControlClient) -> None:
        time.sleep(self.rnd.uniform(0, 0.05))
        live = [n for n, r in self.exp.snapshots.items() if r.delete_sent is None]
        if len(live) > 2 * LIVE_SNAPSHOTS or (len(live) > 4 and self.rnd.random() < 0.4):
            self.delete(client, self.rnd.choice(sorted(live)))
        else:
            both = self.rnd.random() < 0.75
            self.create(client, list(VOLUMES) if both else [self.rnd.choice(VOLUMES)])

    def delete(self, client: ControlClient, name: str) -> None:
        record = self.exp.snapshots[name]
        record.delete_sent = self.disk.events()
        client.call("snapshot.delete", names=[name])
        record.delete_confirmed = self.disk.events()

    def create(self, client: ControlClient, volumes: list[str]) -> None:
        logs = {v: self.exp.volumes[v].log for v in volumes}
        requested = self.disk.events()
        clocks = {v: log.now() for v, log in logs.items()}
        result = client.call("snapshot.create", volumes=volumes)
        confirmed = self.disk.events()
        returned = {v: log.now() for v, log in logs.items()}
        for snap in result["snapshots"]:
            name, v = snap["name"], snap["volume"]
            image = read_export(self.uri(name))
            check_cut(decode(image), logs[v], [0] * BLOCKS, clocks[v], returned[v], name)
            self.exp.snapshots[name] = SnapshotRecord(hashlib.sha256(image).hexdigest())
        names = tuple(s["name"] for s in result["snapshots"])
        self.exp.sets.append(SetRecord(names, requested, confirmed))


def record_run(
    service_factory: Any, disk: RecordedDisk, rnd: random.Random
) -> tuple[PowerLoad, int]:
    """The service on the disk, its volumes, the load; the event count when it began."""
    state_dir = disk.mountpoint  # the service log goes next to it, off the recorded disk
    service = service_factory(state_dir, "--no-fuse")
    disk.before_unmount.append(service.stop)
    for v in VOLUMES:
        service.cli.run("volume", "create", v, "--size", str(BLOCKS * BLOCK))
    start = disk.events()
    load = PowerLoad(disk, state_dir, rnd)
    load.run(OPERATIONS)
    dropped = {v["name"]: v.get("policy_victims") for v in service.cli.json("volume", "list")}
    assert not any(dropped.values()), (
        f"the full policy deleted snapshots: {dropped} (the "
        "model cannot know when: give the disk more room or keep fewer snapshots)"
    )
    assert service.stop() == 0, f"shadowblk serve did not stop cleanly:\n{service.log()}"
    return load, start


def replay(
    disk: RecordedDisk, exp: Expectations, states: list[CrashState], seen: Counter[str]
) -> list[str]:
    """Check every state; a description of each failing one (at most MAX_FAILED_STATES)."""
    mat = Materialiser(disk.base, disk.log, read_log(disk.log))
    failures: list[str] = []
    try:
        for state in states:
            problems = check_crash_state(mat, state, disk.mountpoint, exp, seen)
            if problems:
                failures.append(f"state {state.describe()}: " + "; ".join(problems))
                keep_image(mat.image, state)
            if len(failures) >= MAX_FAILED_STATES:
                break
    finally:
        mat.close()
    return failures


def keep_image(image: Path, state: CrashState) -> None:
    keep = os.environ.get("SHADOWBLK_KEEP_FAILED")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, Path(keep) / f"powerloss-{SEED}-{state.durable}-{state.horizon}.img")


@pytest.mark.timeout(max(600, STATES * 3))
def test_power_loss_states_keep_the_contract(service_factory: Any, short_tmp: Path) -> None:
    reason = missing_host_support()
    if reason:
        pytest.skip(f"power-loss replay needs FUSE and loop devices: {reason}")
    rnd = random.Random(SEED)
    began = time.monotonic()
    with RecordedDisk(short_tmp, DISK_SIZE) as disk:
        load, start = record_run(service_factory, disk, rnd)
    recorded = time.monotonic()
    records = read_log(disk.log)
    states = choose_states(records, start, STATES, rnd, load.exp.in_flight())
    seen: Counter[str] = Counter()
    failures = replay(disk, load.exp, states, seen)
    prefixes = sum(1 for s in states if not s.extra)
    print(
        f"power loss, seed {SEED}: {len(records)} records, "
        f"{len(flush_points(records, start))} flushes, {len(load.exp.sets)} sets; "
        f"{len(states)} states ({prefixes} prefixes) checked, {len(failures)} failed; "
        f"recorded in {recorded - began:.0f} s, replayed in {time.monotonic() - recorded:.0f} s"
    )
    print(f"operations in flight at the crash: {dict(sorted(seen.items()))}")
    assert not failures, f"seed {SEED}: " + "\n".join(failures)
    assert len(states) >= min(STATES, 300), f"only {len(states)} crash states in the log"
