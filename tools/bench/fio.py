"""fio jobs over NBD (`--ioengine=nbd --uri=...`), parsed from `--output-format=json`.

A `Job` is the workload (pattern, block size, depth, how much or how long); `run` runs it
against one URI and returns a `Result`: IOPS and bytes per second of the direction that
moved data, and completion-latency percentiles. fio's nbd engine opens one connection per
job and prints "fio: connected to NBD server" before the JSON: the parser skips to the
first "{".
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import MiB
from .runner import killpg

FIO_TIMEOUT = 900.0


@dataclass(frozen=True)
class Job:
    rw: str  # read, write, randread, randwrite
    bs: str  # 4k, 1M
    iodepth: int = 1
    size: int | None = None  # bytes of the target fio covers (default: all of it)
    runtime: float | None = None  # seconds: time-based, looping over `size`
    io_size: int | None = None  # bytes to transfer in all (not time-based)
    end_fsync: bool = False  # a FLUSH at the end, counted in the job's time
    extra: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        args = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]
        if self.size is not None:
            args.append(f"--size={self.size}")
        if self.runtime is not None:
            args += ["--time_based", f"--runtime={max(1, round(self.runtime * 1000))}ms"]
        if self.io_size is not None:
            args.append(f"--io_size={self.io_size}")
        if self.end_fsync:
            args.append("--end_fsync=1")
        return [*args, *self.extra]


@dataclass(frozen=True)
class Result:
    iops: float
    bw: float  # bytes per second
    lat_p50_us: float
    lat_p99_us: float
    ios: int

    @property
    def mib_s(self) -> float:
        return self.bw / MiB


def nbd_argv(uri: str, job: Job, name: str = "bench") -> list[str]:
    return ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
            "--output-format=json", *job.argv()]  # fmt: skip


def file_argv(path: Path, job: Job, name: str = "bench") -> list[str]:
    """The same job on a file (the FUSE section), through the page cache, synchronously."""
    return ["fio", f"--name={name}", "--ioengine=psync", f"--filename={path}",
            "--output-format=json", *job.argv()]  # fmt: skip


def run(uri: str, job: Job) -> Result:
    return run_argv(nbd_argv(uri, job))


def run_argv(argv: list[str]) -> Result:
    with Background(argv) as fio:
        return fio.wait(FIO_TIMEOUT)


def parse(argv: list[str], code: int | None, stdout: str, stderr: str) -> Result:
    """The job's figures from fio's JSON report; RuntimeError if fio or its job failed."""
    command = " ".join(argv)
    if code != 0 or "{" not in stdout:
        raise RuntimeError(f"{command}: exited {code}\n{stderr.strip()[-2000:]}")
    report = json.loads(stdout[stdout.index("{") :])
    (job,) = report["jobs"]
    if job["error"] != 0:
        raise RuntimeError(f"{command}: job error {job['error']}\n{stderr.strip()[-2000:]}")
    side = _busy_side(job)
    clat = side.get("clat_ns", {}).get("percentile", {})
    return Result(
        iops=float(side["iops"]), bw=float(side["bw_bytes"]),
        lat_p50_us=float(clat.get("50.000000", 0)) / 1000,
        lat_p99_us=float(clat.get("99.000000", 0)) / 1000,
        ios=int(side["total_ios"]),
    )  # fmt: skip


def _busy_side(job: dict[str, Any]) -> dict[str, Any]:
    read, write = job["read"], job["write"]
    side: dict[str, Any] = write if write["io_bytes"] > read["io_bytes"] else read
    return side


class Background:
    """fio in its own process group (its jobs are forked children: killing fio alone
    would orphan them, holding the server's connection and fio's pipes open). `stop()`
    ends it with SIGINT, after which fio still prints its report; leaving the `with`
    block kills whatever of the group is left."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, start_new_session=True)  # fmt: skip

    @classmethod
    def nbd(cls, uri: str, job: Job) -> Background:
        return cls(nbd_argv(uri, job, name="load"))

    def wait(self, timeout: float) -> Result:
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._killpg(signal.SIGKILL)
            raise RuntimeError(f"{' '.join(self.argv)}: still running after {timeout} s") from None
        # fio stopped by SIGINT exits 128 after printing its report
        code = self.process.returncode
        return parse(self.argv, 0 if code in (0, 128, -signal.SIGINT) else code, stdout, stderr)

    def stop(self) -> Result:
        if self.process.poll() is None:
            self._killpg(signal.SIGINT)
        return self.wait(60)

    def running(self) -> bool:
        return self.process.poll() is None

    def _killpg(self, sig: int) -> None:
        killpg(self.process, sig)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.returncode is None:  # not reaped: the group id is still ours
            self._killpg(signal.SIGKILL)
            self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
