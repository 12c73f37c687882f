"""Sizes on the command line: binary units, exact round trips, clear refusals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowblk.tools.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("64K", 65536),
        ("64k", 65536),
        ("64KiB", 65536),
        ("64KB", 65536),
        ("1M", 1 << 20),
        ("1G", 1 << 30),
        ("15T", 15 << 40),
        ("64T", 64 << 40),
        ("1.5G", 3 << 29),
        (" 2M ", 2 << 20),
        ("0", 0),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1", "1X", "1.1", "0.3K", "1 G B", "1e9", "64TT"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size|bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (1000, "1000"), (4096, "4K"), (65536, "64K"), (1 << 30, "1G"), (64 << 40, "64T"),
     (3 << 29, "1536M"), (1025, "1.0K"), ((1 << 20) + 1, "1.0M")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from(["K", "M", "G", "T"]))
def test_whole_kibibytes_round_trip(number: int, unit: str) -> None:
    size = parse_size(f"{number}{unit}")
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=0, max_value=1023))
def test_bytes_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size
