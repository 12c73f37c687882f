"""The atheris harnesses (atheris_nbd.py, atheris_control.py) import and run without atheris,
on their seeds and a few fixed inputs, so that they cannot rot between runs by hand; and a
parser that raises an undocumented exception is a finding for them.

Each harness is imported afresh with `atheris` hidden (as when it is not installed): what
runs here is the uninstrumented path of `TestOneInput`, the one libFuzzer calls.
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

FIXED = [b"", b"\x00", b"\x01", b"\x02", b"\x02\xff" * 40, b"\x00" + b"\xff" * 64]


def fresh_import(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    monkeypatch.setitem(sys.modules, "atheris", None)  # import atheris -> ImportError
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    assert module.atheris is None
    return module


@pytest.fixture
def nbd_harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    harness = fresh_import(monkeypatch, "atheris_nbd")
    yield harness
    harness.forget_target()


@pytest.fixture
def control_harness(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return fresh_import(monkeypatch, "atheris_control")


def inputs(seeds: list[bytes]) -> list[bytes]:
    rnd = random.Random(7)
    noise = [bytes([shape]) + rnd.randbytes(rnd.randrange(300)) for shape in [0, 1, 2] * 10]
    return [*seeds, *FIXED, *noise]


def test_the_nbd_harness_runs_its_inputs(nbd_harness: ModuleType) -> None:
    for data in inputs(nbd_harness.SEEDS):
        nbd_harness.TestOneInput(data)
    assert nbd_harness.target().cases >= 3 * 10


def test_the_control_harness_runs_its_inputs(control_harness: ModuleType) -> None:
    for data in inputs(control_harness.SEEDS):
        control_harness.TestOneInput(data)


def test_an_undocumented_exception_is_a_finding(
    nbd_harness: ModuleType, control_harness: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(data: object) -> None:
        raise IndexError("a parser bug")

    monkeypatch.setattr(nbd_harness.codec, "decode_meta_request", broken)
    with pytest.raises(IndexError):
        nbd_harness.TestOneInput(b"\x00")
    monkeypatch.setattr(control_harness.protocol, "validate_request", broken)
    with pytest.raises(IndexError):
        control_harness.TestOneInput(b'\x00{"id": 1, "op": "status"}')


def test_a_wrong_answer_is_a_finding(nbd_harness: ModuleType) -> None:
    """The oracle is live: a server that says nothing to NBD_OPT_LIST fails the case."""
    nbd_harness.exchange = lambda stream: b""
    with pytest.raises(AssertionError):
        nbd_harness.TestOneInput(nbd_harness.SEEDS[0])
