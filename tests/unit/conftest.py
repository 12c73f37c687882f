"""Fixtures of the engine tests: an engine on a fresh state directory, closed after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowblk.provider.engine import Engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "state")
    yield eng
    eng.close()
