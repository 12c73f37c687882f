"""The interop layer: real NBD clients (nbdcopy, qemu-img, qemu-io, nbdinfo) run as
subprocesses against a real `shadowblk serve`.

`clients` (a `Clients` bound to `state_dir`) is what tests use:
- `.run(*argv, expect=0)` runs a command and checks its exit code; `.fails(*argv)` checks
  that it exits non-zero (a client killed by a signal is not a clean failure). Either raises
  AssertionError naming the command line and quoting its stderr.
- `.uri(export)`; `.copy_in(path, export)` (nbdcopy a file into an export);
  `.digest(export)` (read an export back with nbdcopy: its sha256 and one digest per 64 KiB
  chunk, a `Digest`); `.digest_of(data)` (the same of bytes in memory); `.read(export)`
  (its bytes, read by nbdcopy).
- `.random_file(path, size, rnd)` writes `size` random bytes from a seeded `random.Random`.
`rnd` is that generator, seeded at random; the seed is printed, and
`SHADOWBLK_INTEROP_SEED` replays it. Test modules import `Clients` and `Digest` for type
annotations only (under TYPE_CHECKING): every conftest of this tree is named `conftest`.

What wrote a volume never checks it: data written with nbdcopy, qemu-img or libnbd is read
back with another client or compared with a model the test keeps itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

CHUNK = 64 * 1024  # the volumes' default chunk size: the unit of per-chunk digests
TIMEOUT = 300.0  # failsafe for a hung client; never a pass condition


def _failure(argv: tuple[str, ...], why: str, stderr: str) -> AssertionError:
    return AssertionError(f"{' '.join(argv)}: {why}\nstderr:\n{stderr.strip()}")


def _run(argv: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        raise _failure(argv, f"still running after {timeout} s", stderr) from None


def run(*argv: str, expect: int = 0, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `argv`; AssertionError (argv, stderr) unless it exits `expect`."""
    proc = _run(argv, timeout)
    if proc.returncode != expect:
        raise _failure(argv, f"exited {proc.returncode}, expected {expect}", proc.stderr)
    return proc


def fails(*argv: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `argv`, which must fail cleanly: a non-zero exit, not a crash by a signal."""
    proc = _run(argv, timeout)
    if proc.returncode <= 0:
        raise _failure(argv, f"exited {proc.returncode}, expected a failure", proc.stderr)
    return proc


def random_file(path: Path, size: int, rnd: random.Random) -> str:
    """Write `size` random bytes to `path`; return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for offset in range(0, size, 1 << 20):
            block = rnd.randbytes(min(1 << 20, size - offset))
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class Digest:
    """An image's sha256 and the digest of each of its 64 KiB chunks."""

    sha256: str
    chunks: tuple[bytes, ...]

    @classmethod
    def of(cls, data: bytes | bytearray) -> Digest:
        view = memoryview(data)
        chunks = tuple(chunk_digest(view[i : i + CHUNK]) for i in range(0, len(data), CHUNK))
        return cls(hashlib.sha256(data).hexdigest(), chunks)

    def differing(self, other: Digest) -> set[int]:
        """The chunks whose contents differ between two images of one size."""
        assert len(self.chunks) == len(other.chunks), "images of different sizes"
        return {c for c, (a, b) in enumerate(zip(self.chunks, other.chunks, strict=True)) if a != b}


@dataclass
class Clients:
    """Real clients pointed at the NBD socket of one state directory."""

    state_dir: Path

    run = staticmethod(run)
    fails = staticmethod(fails)
    random_file = staticmethod(random_file)

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.state_dir / 'nbd.sock'}"

    def copy_in(self, path: Path, export: str) -> None:
        run("nbdcopy", os.fspath(path), self.uri(export))

    def digest(self, export: str) -> Digest:
        """The export as nbdcopy reads it, streamed (never held whole in memory)."""
        sha = hashlib.sha256()
        chunks: list[bytes] = []

        def sink(block: bytes) -> None:
            sha.update(block)
            chunks.append(chunk_digest(block))

        self._stream(export, sink)
        return Digest(sha.hexdigest(), tuple(chunks))

    @staticmethod
    def digest_of(data: bytes | bytearray) -> Digest:
        """The same digest of an image the test holds (a model, a file's bytes)."""
        return Digest.of(data)

    def read(self, export: str) -> bytearray:
        data = bytearray()
        self._stream(export, data.extend)
        return data

    def _stream(self, export: str, sink: Callable[[bytes], None]) -> None:
        argv = ("nbdcopy", self.uri(export), "-")
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            while block := proc.stdout.read(CHUNK):
                sink(block)
            stderr = proc.stderr.read().decode(errors="replace")
            code = proc.wait(timeout=TIMEOUT)
        if code != 0:
            raise _failure(argv, f"exited {code}, expected 0", stderr)


@pytest.fixture
def clients(state_dir: Path) -> Clients:
    return Clients(state_dir)


@pytest.fixture
def rnd() -> random.Random:
    """A seeded generator; the seed is printed (and SHADOWBLK_INTEROP_SEED replays it)."""
    seed = int(os.environ.get("SHADOWBLK_INTEROP_SEED", random.randrange(1 << 32)))
    print(f"SHADOWBLK_INTEROP_SEED={seed}")
    return random.Random(seed)
