"""A full diff area under a write load: the origin never fails a write (delete-oldest,
invalidate), every snapshot still listed is bit-exact, and fail-writes says ENOSPC."""

from __future__ import annotations

import errno
import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from exports import connect, export_sha256

MiB = 1 << 20
SIZE = 256 * MiB


def run_rounds(service: Any, rounds: int, writes: int, seed: int) -> dict[str, str]:
    """Write the volume over and over, a snapshot after each round; the model's sha256 at
    each snapshot. Every write must succeed."""
    rng = random.Random(seed)
    model = bytearray(SIZE)
    h = connect(service, "v")
    expected = {}
    for _ in range(rounds):
        for _ in range(writes):
            length = rng.choice((4096, 16384, 65536, 3 * 65536))
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            data = rng.randbytes(length)
            h.pwrite(data, offset)  # raises on any error: none is allowed
            model[offset : offset + length] = data
        h.flush()
        made = service.cli.json("create", "v")["snapshots"][0]["name"]
        expected[made] = hashlib.sha256(model).hexdigest()
    return expected


@pytest.mark.parametrize("policy", ["delete-oldest", "invalidate"])
def test_an_8_mib_diff_limit_never_fails_a_write(service: Any, policy: str) -> None:
    service.cli.run("volume", "create", "v", "--size", "256M", "--sparse", "--max-diff", "8M",
                    "--full-policy", policy)  # fmt: skip
    expected = run_rounds(service, rounds=24, writes=40, seed=1)
    listed = service.cli.json("list")
    alive = [s["name"] for s in listed if s["state"] == "ok"]
    assert alive, "the newest snapshot fits the limit: it must be there"
    assert len(listed) < len(expected) or policy == "invalidate"  # the policy did run
    if policy == "invalidate":
        assert any(s["state"] == "invalid" for s in listed)
    for name in alive:
        assert export_sha256(service, name) == expected[name], name
    volume = service.cli.json("volume", "list")[0]
    assert volume["diff_bytes"] <= 8 * MiB
    victims = len(expected) - len(alive)
    assert volume["policy_victims"] == victims  # and status says so
    assert "dropped when full" in service.cli.run("status").stdout
    log = service.log()
    assert "diff area full" in log
    assert "diff area above 90% of its 8388608-byte limit" in log


def test_fail_writes_answers_enospc(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "8M", "--max-diff", "256K",
                    "--full-policy", "fail-writes")  # fmt: skip
    h = connect(service, "v")
    h.pwrite(b"\x11" * 8 * MiB, 0)
    h.flush()
    service.cli.run("create", "v")
    h.pwrite(b"\x22" * 4096, 0)  # 1 chunk preserved of 4 allowed
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"\x33" * MiB, MiB)  # 16 more chunks: refused, nothing applied
    assert info.value.errnum == errno.ENOSPC
    assert connect(service, "v@1").pread(8 * MiB, 0) == b"\x11" * 8 * MiB
    assert h.pread(MiB, MiB) == b"\x11" * MiB
    assert [s["state"] for s in service.cli.json("list")] == ["ok"]


@pytest.fixture
def small_fs(short_tmp: Path) -> Iterator[Path]:
    """A 64 MiB ext4 filesystem on a loop device: a diff area that runs out of space."""
    image = short_tmp / "small.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    mountpoint = short_tmp / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def test_a_diff_area_on_a_small_filesystem_runs_full_without_failing(
    service: Any, small_fs: Path
) -> None:
    service.cli.run("volume", "create", "v", "--size", "256M", "--sparse",
                    "--diff-area", str(small_fs))  # fmt: skip
    expected = run_rounds(service, rounds=12, writes=120, seed=2)  # ~ 90 MiB to preserve
    listed = service.cli.json("list")
    assert 0 < len(listed) < len(expected)
    for s in listed:
        assert s["state"] == "ok"
        assert export_sha256(service, s["name"]) == expected[s["name"]], s["name"]
    usage = subprocess.run(["df", "--output=pcent", str(small_fs)], capture_output=True,
                           text=True, check=True).stdout.split()[-1]  # fmt: skip
    assert int(usage.rstrip("%")) <= 96  # the 5 % floor held
