"""Fixtures of the control-plane tests: a real engine, a control server in the test's nursery."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from control_client import LineClient

from shadowblk.provider.engine import Engine
from shadowblk.tools.control import ControlServer
from shadowblk.tools.ops import OpContext


@pytest.fixture
def engine(state_dir: Path) -> Iterator[Engine]:
    eng = Engine.open(state_dir)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def op_context(engine: Engine) -> OpContext:
    return OpContext(engine, lambda: {"service": {"pid": 0}}, {"fake": lambda: {"up": 1}})


@pytest.fixture
async def control_server(
    nursery: trio.Nursery, op_context: OpContext, short_tmp: Path
) -> ControlServer:
    server = ControlServer(op_context)
    await nursery.start(server.serve_unix, short_tmp / "control.sock")
    return server


@pytest.fixture
async def control_path(control_server: ControlServer, short_tmp: Path) -> Path:
    return short_tmp / "control.sock"


@pytest.fixture
async def client(control_path: Path) -> AsyncIterator[LineClient]:
    stream = await trio.open_unix_socket(str(control_path))
    async with stream:
        yield LineClient(stream)
