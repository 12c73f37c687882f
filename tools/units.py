"""Sizes as people type them and read them: binary units only (K = 1024, ..., E = 1024**6).

`parse_size` accepts a whole number of bytes ("4096"), optionally with a unit ("64K", "1M",
"15T", "64T"; case-insensitive; "KiB" and "KB" mean the same as "K") and a decimal fraction
when it gives a whole number of bytes ("1.5G"). `format_size` writes the shortest exact form
when there is one ("64K", "1G"), so every size under 1K or a multiple of 1K reads back as
itself, and otherwise a rounded one with one decimal ("1.2M").
"""

from __future__ import annotations

import re
from fractions import Fraction

UNITS = "KMGTPE"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)


def unit_factor(unit: str) -> int:
    """1024 ** position of `unit` ("" is bytes)."""
    return 1 if not unit else 1024 ** (UNITS.index(unit.upper()) + 1)


def parse_size(text: str) -> int:
    """Bytes for `text`; ValueError with a message a person can act on otherwise."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 1M, 1G, 15T)")
    number, unit = match.groups()
    value = Fraction(number) * unit_factor(unit)
    if value.denominator != 1:
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(size: int) -> str:
    """"64K" for 65536; "1.5G" style (rounded) when no unit divides `size` exactly."""
    if size < 0:
        return "-" + format_size(-size)
    for unit in reversed(UNITS):
        factor = unit_factor(unit)
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    if size < 1024:
        return str(size)
    for unit in reversed(UNITS):
        factor = unit_factor(unit)
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    raise AssertionError("unreachable")  # pragma: no cover
