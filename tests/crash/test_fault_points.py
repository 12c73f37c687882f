"""Crash torture at every named fault point (provider/faults.py, docs/reliability.md).

The load and the checks are crashload.py's and test_sigkill's (a writer through NBD,
snapshots created and deleted, I1-I3 checked against the write log after each restart); here
the crash is not a SIGKILL at a random moment but `os._exit` at the Nth hit of one named
point, armed over the control socket. A point not reached within FALLBACK seconds gets a
SIGKILL instead; every point must have crashed the service itself at least once.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from crashload import BLOCK, BLOCKS, writer
from test_sigkill import Crasher

from shadowblk.provider.faults import POINTS
from shadowblk.tools.client import ControlClient

ROUNDS = int(os.environ.get("SHADOWBLK_FAULT_ROUNDS", "6"))  # per point
FALLBACK = 5.0  # seconds before a point not reached is replaced by a SIGKILL
LOAD_POINTS = [p for p in POINTS if not p.startswith("revert.")]  # revert: test_revert


class FaultCrasher(Crasher):
    def fault_round(self, point: str, nth: int, seed: int) -> bool:
        """Arm `point`, run the load (its blocks chosen from `seed`) until the service
        dies, restart, check. True if the point itself crashed it."""
        with ControlClient.connect(self.state_dir, timeout=60) as client:
            client.call("fault.arm", spec=f"{point}=crash@{nth}")
        stop = threading.Event()
        thread = threading.Thread(
            target=writer, args=(self.uri("v"), self.log, self.seqs, stop, None, seed), daemon=True
        )
        thread.start()
        self.killing = threading.Event()
        self.killing.set()  # death is expected, at any moment
        fallback = threading.Timer(FALLBACK, self.service.kill)
        fallback.start()
        try:
            self.snapshot_until_killed()
        finally:
            fallback.cancel()
            stop.set()
            thread.join()
        code = self.service.process.wait(timeout=60)
        self.service.killed = True
        self.start()
        deleting = self.deleting
        try:
            self.verify()
        except AssertionError as exc:
            if os.environ.get("SHADOWBLK_KEEP_FAILED"):
                import shutil

                shutil.copytree(self.state_dir, os.environ["SHADOWBLK_KEEP_FAILED"],
                                ignore=shutil.ignore_patterns("*.sock", "fuse"))
            how = "at it" if code == 137 else f"by fallback (exit {code})"
            raise AssertionError(
                f"crash armed at {point}@{nth}, {how}, deleting {deleting}: {exc}"
            ) from None
        return code == 137

    def snapshot_until_killed(self) -> None:
        """Operations until the service dies; any failure while it still lives is one."""
        try:
            with ControlClient.connect(self.state_dir, timeout=60) as client:
                while True:
                    self.one_operation(client)
        except Exception:
            try:
                self.service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                raise AssertionError("an operation failed while the service lived") from None


@pytest.mark.timeout(max(1800, ROUNDS * len(LOAD_POINTS) * 10))
def test_a_crash_at_every_fault_point_keeps_the_contract(
    service_factory: Any, state_dir: Path
) -> None:
    crasher = FaultCrasher(service_factory, state_dir)
    crasher.start()
    crasher.service.cli.run("volume", "create", "v", "--size", str(BLOCKS * BLOCK))
    rnd = random.Random(int(os.environ.get("SHADOWBLK_CRASH_SEED", "1")))
    fired: Counter[str] = Counter()
    for _ in range(ROUNDS):
        for point in LOAD_POINTS:
            if crasher.fault_round(point, rnd.randrange(1, 6), rnd.randrange(2**32)):
                fired[point] += 1
    never = [p for p in LOAD_POINTS if not fired[p]]
    assert not never, f"these points never crashed the service: {never}"
    print(f"crash states: {sum(fired.values())} at fault points, "
          f"{ROUNDS * len(LOAD_POINTS) - sum(fired.values())} by fallback SIGKILL")  # fmt: skip
