"""Regression (found by tests/fuzz/atheris_control.py): a request string holding a lone
surrogate, which JSON can escape ("\\ud800") but UTF-8 cannot encode, reached the engine and
failed there with `internal` (a `backing` path: UnicodeEncodeError). It is refused by the
validation now, with `invalid-argument`, whatever key or value holds it; the service goes on.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from shadowblk.provider.errors import InvalidArgument
from shadowblk.tools import protocol

LINES = [
    r'{"id": 1, "op": "volume.create", "args": {"name": "w", "size": 4096, "sparse": true,'
    r' "backing": "/tmp/\ud800"}}',
    r'{"id": 2, "op": "snapshot.create", "args": {"volumes": ["v"], "label": "\udcff"}}',
    r'{"id": 3, "op": "status", "args": {"\udcff": 1}}',
    r'{"id": "\ud800", "op": "status"}',
]


def exchange(service: Any, line: str) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(service.control_socket))
        sock.sendall(line.encode() + b"\n")
        with sock.makefile("rb") as f:
            return json.loads(f.readline())


@pytest.mark.parametrize("line", LINES)
def test_validation_refuses_a_lone_surrogate(line: str) -> None:
    with pytest.raises(InvalidArgument, match="lone surrogate"):
        protocol.validate_request(protocol.decode_line(line.encode()))


def test_the_service_answers_invalid_argument_not_internal(service: Any) -> None:
    service.cli.run("volume", "create", "v", "--size", "1M", "--sparse")
    for line in LINES:
        reply = exchange(service, line)
        assert reply["ok"] is False
        assert reply["error"]["code"] == "invalid-argument", reply
    assert [v["name"] for v in service.cli.json("volume", "list")] == ["v"]
    assert service.cli.json("list") == []
    assert exchange(service, '{"id": 9, "op": "status"}')["ok"] is True
