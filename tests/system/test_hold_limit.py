"""The hold limit under slow storage, through a real service (DESIGN.md, snapshot creation,
step 4: flush and hold writes, at most the hold limit; past it, abort with `hold-timeout`
and release).

The service runs with `serve --hold-timeout 1`. A snapshot exists, so a write to the volume
needs a preserve; a `delay:` fault then slows that preserve well past the limit (a slow
diff-area sync: `preserve.sync`; a slow index commit: `preserve.commit`), and `create` is
asked meanwhile. A whole-chunk write is too large for the origin journal, so `create` must
wait for it to reach the origin, and cannot. A slow write-back of that write to the origin
(`origin.write`: outside the engine lock, in rounds, the last one under it) must not
stretch the hold either: `create` waits for the lock at most the hold limit. A slow sync of
the origin during creation (`snapshot.sync`, before its journal's fdatasync) fails it the
same way.

A 4 KiB write is journaled when it is acknowledged, preserve or not: the same slow preserve
then does not hold `create` at all (it succeeds under the 1 s limit while the preserve
takes 4 s), and the new snapshot reads that write.

Meanwhile a writer thread keeps writing over NBD, some of its writes while the hold is on.
Checks: the reply is `hold-timeout` with a message naming the hold limit; no snapshot was
added; every write of the writer was acknowledged (none failed) and reads back; the next
`create` succeeds; the older snapshot is intact.
"""

from __future__ import annotations

import threading
from typing import Any

import nbd
import pytest
from exports import connect

from shadowblk.provider.errors import HoldTimeout
from shadowblk.tools.client import ControlClient

MiB = 1 << 20
BLOCK = 4096
HOLD = "1"  # seconds: serve --hold-timeout
DELAY_MS = 4000  # the slow step: well past the hold limit


class Writer:
    """Writes block after block over its own NBD connection until stopped; counts the
    writes it issued while `holding` was set, and keeps the first error."""

    def __init__(self, service: Any, start: int, blocks: int) -> None:
        self.handle = connect(service, "v")
        self.start, self.blocks = start, blocks
        self.holding = threading.Event()
        self.issued_in_hold = 0
        self.written: dict[int, bytes] = {}  # offset -> the last bytes acknowledged there
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer")

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "a write never completed"

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                offset = self.start + n % self.blocks * BLOCK
                data = n.to_bytes(8, "big") * (BLOCK // 8)
                self.issued_in_hold += self.holding.is_set()
                self.handle.pwrite(data, offset)
                self.written[offset] = data
                n += 1
            self.handle.flush()
        except nbd.Error as exc:
            self.error = exc


def arm(service: Any, spec: str) -> None:
    with ControlClient.connect(service.state_dir) as client:
        client.call("fault.arm", spec=spec)


def create(service: Any) -> Any:
    with ControlClient.connect(service.state_dir) as client:
        return client.call("snapshot.create", volumes=["v"])


CHUNK = 65536  # the volume's chunk: a write this large bypasses the journal


@pytest.mark.parametrize(
    ("point", "size"),
    [
        ("preserve.sync", CHUNK),
        ("preserve.commit", CHUNK),
        ("origin.write", CHUNK),
        ("snapshot.sync", BLOCK),
    ],
)
def test_a_flush_past_the_hold_limit_fails_create_and_loses_no_write(
    service_factory: Any, state_dir: Any, point: str, size: int
) -> None:
    service = service_factory(state_dir, "--hold-timeout", HOLD)
    h = snapshotted_volume(service)
    arm(service, f"{point}=delay:{DELAY_MS}")
    h.pwrite(b"b" * size, 0)  # acknowledged at once; its preserve or write-back is slow
    with Writer(service, MiB, 256) as writer:
        writer.holding.set()
        with pytest.raises(HoldTimeout) as info:
            create(service)
        writer.holding.clear()
    assert info.value.code == "hold-timeout"
    assert "hold limit" in info.value.message
    assert writer.error is None, f"a write failed: {writer.error}"
    assert writer.issued_in_hold >= 1
    assert [s["name"] for s in service.cli.json("list")] == ["v@1"]
    check_writes(service, writer.written)
    arm(service, "")  # disarm (the delay fired once already)
    h.flush()  # the slow write has reached the origin
    assert [s["name"] for s in create(service)["snapshots"]] == ["v@2"]
    assert connect(service, "v@1").pread(MiB, 0) == b"a" * MiB
    assert connect(service, "v@2").pread(BLOCK, 0) == b"b" * BLOCK
    assert service.cli.run("status").returncode == 0


@pytest.mark.parametrize("point", ["preserve.sync", "preserve.commit", "origin.write"])
def test_a_slow_preserve_of_a_journaled_write_does_not_hold_create(
    service_factory: Any, state_dir: Any, point: str
) -> None:
    service = service_factory(state_dir, "--hold-timeout", HOLD)
    h = snapshotted_volume(service)
    arm(service, f"{point}=delay:{DELAY_MS}")
    h.pwrite(b"b" * BLOCK, 0)  # journaled: durable at the next sync, its preserve slow
    with Writer(service, MiB, 256) as writer:
        created = create(service)  # under the 1 s limit, while the preserve takes 4 s
    assert [s["name"] for s in created["snapshots"]] == ["v@2"]
    assert writer.error is None, f"a write failed: {writer.error}"
    check_writes(service, writer.written)
    assert connect(service, "v@2").pread(BLOCK, 0) == b"b" * BLOCK  # the overlay's bytes
    assert connect(service, "v@1").pread(BLOCK, 0) == b"a" * BLOCK  # the preserved ones
    h.pwrite(b"c" * BLOCK, 0)  # a write of the new epoch: waits for the old preserve
    h.flush()
    assert connect(service, "v@2").pread(BLOCK, 0) == b"b" * BLOCK
    assert connect(service, "v@1").pread(MiB, 0) == b"a" * MiB
    assert h.pread(BLOCK, 0) == b"c" * BLOCK
    assert service.cli.run("status").returncode == 0


def snapshotted_volume(service: Any) -> Any:
    """Volume v (8 MiB of "a") with snapshot v@1; an NBD handle of v."""
    service.cli.run("volume", "create", "v", "--size", "8M")
    h = connect(service, "v")
    h.pwrite(b"a" * (8 * MiB), 0)
    h.flush()
    service.cli.run("create", "v")
    return h


def check_writes(service: Any, written: dict[int, bytes]) -> None:
    """Every acknowledged write reads back, over a fresh NBD connection."""
    reader = connect(service, "v")
    assert written, "the writer wrote nothing"
    for offset, data in written.items():
        assert reader.pread(BLOCK, offset) == data, f"write at {offset} lost"
    assert reader.pread(BLOCK, 0) == b"b" * BLOCK
