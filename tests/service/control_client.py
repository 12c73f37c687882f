"""A raw control-socket client for tests: bytes out, decoded lines in."""

from __future__ import annotations

import json
from typing import Any

import trio

from shadowblk.tools.control import LineReader


class LineClient:
    """A raw control-socket client: bytes out, decoded lines in."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = LineReader(stream, limit=1 << 30)
        self.ids = 0

    async def send_line(self, line: bytes) -> None:
        await self.stream.send_all(line + b"\n")

    async def receive(self) -> Any:
        line = await self.reader.readline()
        assert line is not None, "the service closed the connection"
        return json.loads(line)

    async def request(self, op: str, **args: Any) -> Any:
        """A well-formed request; its reply (events arriving first are skipped)."""
        self.ids += 1
        await self.send_line(json.dumps({"id": self.ids, "op": op, "args": args}).encode())
        while "event" in (reply := await self.receive()):
            pass
        assert reply["id"] == self.ids
        return reply

    async def result(self, op: str, **args: Any) -> Any:
        reply = await self.request(op, **args)
        assert reply["ok"] is True, reply
        return reply["result"]

    async def at_eof(self) -> bool:
        return await self.reader.readline() is None
