"""`shadowblk verify`: corruption injected into the diff area is found, exactly, and reads
of it fail with EIO instead of returning wrong bytes."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
from exports import connect

from shadowblk.tools.client import ControlClient

CHUNK = 64 * 1024


def flip(data_file: Path, content: bytes, block: int) -> None:
    """Flip one bit in block `block` of the slot that holds `content`."""
    slots = data_file.read_bytes()
    found = [i for i in range(len(slots) // CHUNK) if slots[i * CHUNK :][:CHUNK] == content]
    assert len(found) == 1, found
    at = found[0] * CHUNK + block * 4096 + 17
    with open(data_file, "r+b") as f:
        f.seek(at)
        f.write(bytes([slots[at] ^ 0x04]))


def test_verify_names_exactly_the_damaged_chunks(service: Any) -> None:
    cli = service.cli
    cli.run("volume", "create", "v", "--size", "4M")
    original = os.urandom(4 << 20)
    h = connect(service, "v")
    h.pwrite(original, 0)
    cli.run("create", "v")
    first = {c: os.urandom(4096) for c in (3, 10, 20)}
    for c, data in first.items():
        h.pwrite(data, c * CHUNK)
    cli.run("create", "v")
    h.pwrite(os.urandom(4096), 10 * CHUNK)  # chunk 10 again: an entry for v@2 too
    h.flush()

    clean = cli.run("verify")
    assert "checked 4 preserved chunks: no damage" in clean.stdout

    diff_area = Path(cli.json("volume", "list")[0]["diff_area"])
    flip(diff_area / "chunks.dat", original[3 * CHUNK :][:CHUNK], block=2)
    flip(diff_area / "chunks.dat", original[10 * CHUNK :][:CHUNK], block=15)

    proc = cli.run("verify", "--json", expect=1)
    report = json.loads(proc.stdout)
    assert report["checked"] == 4
    found = sorted((d["chunk"], d["offset"], d["snapshots"]) for d in report["damaged"])
    assert found == [(3, 3 * CHUNK, ["v@1"]), (10, 10 * CHUNK, ["v@1"])]
    assert "damaged" in proc.stderr

    old = connect(service, "v@1")
    for offset in (3 * CHUNK + 2 * 4096, 10 * CHUNK + 15 * 4096):
        with pytest.raises(nbd.Error) as info:
            old.pread(4096, offset)
        assert info.value.errnum == errno.EIO
    assert old.pread(CHUNK, 20 * CHUNK) == original[20 * CHUNK :][:CHUNK]
    assert old.pread(4096, 3 * CHUNK) == original[3 * CHUNK :][:4096]  # an intact block
    newer = connect(service, "v@2")
    expected = first[10] + original[10 * CHUNK + 4096 :][: CHUNK - 4096]
    assert newer.pread(CHUNK, 10 * CHUNK) == expected
    states = {s["name"]: s["state"] for s in cli.json("list")}
    assert states == {"v@1": "damaged", "v@2": "ok"}
    assert "no damage" in cli.run("verify", "v@2").stdout
    cli.run("verify", "v@1", expect=1)


def test_verify_reports_progress_to_its_requester(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "2M")
    h = connect(service, "v")
    h.pwrite(os.urandom(2 << 20), 0)
    service.cli.run("create", "v")
    h.pwrite(os.urandom(2 << 20), 0)
    h.flush()
    events: list[dict[str, Any]] = []
    with ControlClient.connect(service.state_dir) as client:
        result = client.call("verify", on_event=events.append, progress=True)
    assert result == {"checked": 32, "damaged": []}
    assert events and events[-1]["data"] == {"done": 32, "total": 32}
    assert {e["event"] for e in events} == {"verify.progress"}


def test_background_scrub_finds_damage(service_factory: Any, short_tmp: Path) -> None:
    svc = service_factory(short_tmp / "scrubbed", "--scrub-interval", "1")
    svc.cli.run("volume", "create", "v", "--size", "1M")
    original = os.urandom(1 << 20)
    h = connect(svc, "v")
    h.pwrite(original, 0)
    svc.cli.run("create", "v")
    h.pwrite(os.urandom(4096), 5 * CHUNK)
    h.flush()
    flip(Path(svc.cli.json("volume", "list")[0]["diff_area"]) / "chunks.dat",
         original[5 * CHUNK :][:CHUNK], block=0)  # fmt: skip
    deadline = time.monotonic() + 60  # a bound on the wait, not a figure checked
    while svc.cli.json("list")[0]["state"] != "damaged":
        assert time.monotonic() < deadline, svc.log()
        time.sleep(0.2)
    assert "scrub: 1 of 1 preserved chunks damaged" in svc.log()
