"""The hold limit under slow storage, through a real service (DESIGN.md, snapshot creation,
step 4: flush and hold writes, at most the hold limit; past it, abort with `hold-timeout`
and release).

The service runs with `serve --hold-timeout 1`. A snapshot exists, so a write to the volume
needs a preserve; a `delay:` fault then slows that preserve well past the limit (a slow
diff-area sync: `preserve.sync`; a slow index commit: `preserve.commit`), and `create` is
asked meanwhile: it must wait for that write to reach the origin, and cannot. A slow
write-back of that write to the origin (`origin.write`: outside the engine lock, in rounds,
the last one under it) must not stretch the hold either: `create` waits for the lock at
most the hold limit. A slow sync of the origin during creation (`snapshot.sync`, before
its journal's fdatasync) fails it the same way.

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


@pytest.mark.parametrize(
    "point", ["preserve.sync", "preserve.commit", "origin.write", "snapshot.sync"]
)
def test_a_flush_past_the_hold_limit_fails_create_and_loses_no_write(
    service_factory: Any, state_dir: Any, point: str
) -> None:
    service = service_factory(state_dir, "--hold-timeout", HOLD)
    service.cli.run("volume", "create", "v", "--size", "8M")
    h = connect(service, "v")
    h.pwrite(b"a" * (8 * MiB), 0)
    h.flush()
    service.cli.run("create", "v")
    arm(service, f"{point}=delay:{DELAY_MS}")
    h.pwrite(b"b" * BLOCK, 0)  # acknowledged at once; its preserve or write-back is slow
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


def check_writes(service: Any, written: dict[int, bytes]) -> None:
    """Every acknowledged write reads back, over a fresh NBD connection."""
    reader = connect(service, "v")
    assert written, "the writer wrote nothing"
    for offset, data in written.items():
        assert reader.pread(BLOCK, offset) == data, f"write at {offset} lost"
    assert reader.pread(BLOCK, 0) == b"b" * BLOCK
