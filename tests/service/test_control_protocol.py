"""The control protocol against a real engine: operations, validation, errors, framing."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from control_client import LineClient

from shadowblk.provider.errors import InvalidArgument, Locked
from shadowblk.provider.unixsock import remove_stale_socket
from shadowblk.tools import protocol
from shadowblk.tools.client import error_from_reply
from shadowblk.tools.control import ControlServer
from shadowblk.tools.ops import HANDLERS, OpContext


async def test_volume_and_snapshot_lifecycle(client: LineClient) -> None:
    vol = await client.result("volume.create", name="vol0", size=1 << 20, sparse=True)
    assert (vol["name"], vol["size"], vol["chunk_size"]) == ("vol0", 1 << 20, 65536)
    await client.result("volume.create", name="vol1", size=1 << 20, chunk_size=4096)
    assert [v["name"] for v in await client.result("volume.list")] == ["vol0", "vol1"]

    made = await client.result("snapshot.create", volumes=["vol0", "vol1"], label="nightly")
    names = [s["name"] for s in made["snapshots"]]
    assert names == ["vol0@1", "vol1@1"]
    assert {s["set"] for s in made["snapshots"]} == {made["set"]}
    assert {s["label"] for s in made["snapshots"]} == {"nightly"}
    await client.result("snapshot.create", volumes=["vol0"])

    listed = await client.result("snapshot.list", volume="vol0")
    assert [s["name"] for s in listed] == ["vol0@1", "vol0@2"]
    assert await client.result("snapshot.delete", oldest="vol0") == {"deleted": ["vol0@1"]}
    assert await client.result("snapshot.delete", set=made["set"]) == {"deleted": ["vol1@1"]}
    assert await client.result("snapshot.delete", names=["vol0@2"]) == {"deleted": ["vol0@2"]}
    assert await client.result("snapshot.list") == []

    status = await client.result("status")
    assert status["service"] == {"pid": 0}
    assert [v["name"] for v in status["volumes"]] == ["vol0", "vol1"]
    assert status["snapshots"] == 0
    await client.result("volume.remove", name="vol1")
    assert [v["name"] for v in await client.result("volume.list")] == ["vol0"]


async def test_stats_gathers_every_source(client: LineClient) -> None:
    stats = await client.result("stats")
    assert stats["fake"] == {"up": 1}
    assert isinstance(stats["engine"], dict)


async def test_delete_checks_every_name_before_deleting(client: LineClient) -> None:
    await client.result("volume.create", name="vol0", size=1 << 20, sparse=True)
    await client.result("snapshot.create", volumes=["vol0"])
    reply = await client.request("snapshot.delete", names=["vol0@1", "vol0@9"])
    assert reply["error"]["code"] == "not-found"
    assert "vol0@9" in reply["error"]["message"]
    assert [s["name"] for s in await client.result("snapshot.list")] == ["vol0@1"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({}, "invalid-argument"),
        ({"names": ["a@1"], "oldest": "a"}, "invalid-argument"),
        ({"set": "no-such-set"}, "not-found"),
        ({"oldest": "nosuchvolume"}, "not-found"),
    ],
)
async def test_delete_selection_errors(client: LineClient, args: dict[str, Any], code: str) -> None:
    reply = await client.request("snapshot.delete", **args)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code


async def test_engine_errors_keep_their_code(client: LineClient) -> None:
    reply = await client.request("volume.remove", name="ghost")
    assert reply == {
        "id": 1,
        "ok": False,
        "error": {"code": "not-found", "message": "no volume named ghost"},
    }
    await client.result("volume.create", name="vol0", size=1 << 20, sparse=True)
    again = await client.request("volume.create", name="vol0", size=1 << 20)
    assert again["error"]["code"] == "already-exists"


@pytest.mark.parametrize(
    "line",
    [
        b"{not json",
        b"\xff\xfe",
        b"[" * 100000,
        b'"just a string"',
        b"[1, 2]",
        b'{"id": 1}',
        b'{"op": "status"}',
        b'{"id": 1.5, "op": "status"}',
        b'{"id": true, "op": "status"}',
        b'{"id": 1, "op": 7}',
        b'{"id": 1, "op": "status", "args": []}',
        b'{"id": 1, "op": "status", "extra": 1}',
    ],
)
async def test_malformed_requests_are_refused_and_the_connection_goes_on(
    client: LineClient, line: bytes
) -> None:
    await client.send_line(line)
    reply = await client.receive()
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid-argument"
    assert reply["error"]["message"]
    assert (await client.request("status"))["ok"] is True


async def test_unknown_op_is_named(client: LineClient) -> None:
    reply = await client.request("volume.explode")
    assert reply["error"]["code"] == "invalid-argument"
    assert "volume.explode" in reply["error"]["message"]


@pytest.mark.parametrize("op", sorted(protocol.OPS))
async def test_every_op_refuses_unknown_keys(client: LineClient, op: str) -> None:
    reply = await client.request(op, bogus_key=1)
    assert reply["error"]["code"] == "invalid-argument"
    assert "bogus_key" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("op", "args", "word"),
    [
        ("volume.create", {"name": "v", "size": "1G"}, "size"),
        ("volume.create", {"name": "v", "size": True}, "size"),
        ("volume.create", {"name": "v", "size": 0}, "size"),
        ("volume.create", {"name": "v", "size": 1.5}, "size"),
        ("volume.create", {"name": "", "size": 4096}, "name"),
        ("volume.create", {"name": "v", "size": 4096, "sparse": "yes"}, "sparse"),
        ("volume.create", {"name": "v", "backing": "relative/file"}, "backing"),
        ("volume.create", {"name": "v", "size": 4096, "full_policy": "panic"}, "full_policy"),
        ("volume.create", {"size": 4096}, "name"),
        ("volume.remove", {"name": ["v"]}, "name"),
        ("snapshot.create", {"volumes": "vol0"}, "volumes"),
        ("snapshot.create", {"volumes": []}, "volumes"),
        ("snapshot.create", {"volumes": [1]}, "volumes"),
        ("snapshot.create", {"volumes": ["v"], "label": 3}, "label"),
        ("snapshot.list", {"volume": None}, "volume"),
        ("snapshot.delete", {"names": "vol0@1"}, "names"),
        ("snapshot.delete", {"set": 12}, "set"),
    ],
)
async def test_wrong_types_are_refused(
    client: LineClient, op: str, args: dict[str, Any], word: str
) -> None:
    reply = await client.request(op, **args)
    assert reply["error"]["code"] == "invalid-argument", reply
    assert repr(word) in reply["error"]["message"]
    assert await client.result("volume.list") == []  # nothing was created, still serving


async def test_pipelined_requests_are_answered_in_order(client: LineClient) -> None:
    lines = [json.dumps({"id": f"r{i}", "op": "volume.list"}).encode() for i in range(20)]
    await client.stream.send_all(b"\n".join(lines) + b"\n\n")
    replies = [await client.receive() for _ in lines]
    assert [r["id"] for r in replies] == [f"r{i}" for i in range(20)]


async def test_a_line_over_the_limit_is_refused_and_closes(
    client: LineClient, control_path: Path
) -> None:
    await client.stream.send_all(b"x" * (protocol.MAX_LINE + 1))
    reply = await client.receive()
    assert reply["error"]["code"] == "invalid-argument"
    assert "longer than" in reply["error"]["message"]
    assert await client.at_eof()
    async with await trio.open_unix_socket(str(control_path)) as stream:
        assert (await LineClient(stream).request("status"))["ok"] is True


async def test_a_line_at_the_limit_is_read(client: LineClient) -> None:
    line = b'{"id": 1, "op": "status"}'
    await client.send_line(line + b" " * (protocol.MAX_LINE - len(line)))
    assert (await client.receive())["ok"] is True


class BrokenEngine:
    """The real engine, except that `statistics` has a bug and a snapshot creation meets
    failing storage."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def statistics(self) -> dict[str, Any]:
        raise ZeroDivisionError("bug in statistics")

    def create_snapshot_set(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "volume v: an acknowledged write is not on the origin yet")


@pytest.mark.parametrize(
    ("op", "args", "code", "text", "bug"),
    [
        ("stats", {}, "internal", "ZeroDivisionError", ZeroDivisionError),
        ("snapshot.create", {"volumes": ["v"]}, "io-error", "not on the origin yet", None),
    ],
)
async def test_a_bug_is_internal_and_a_storage_error_is_io_error(
    nursery: trio.Nursery,
    op_context: OpContext,
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
    op: str,
    args: dict[str, Any],
    code: str,
    text: str,
    bug: type[Exception] | None,
) -> None:
    ctx = OpContext(BrokenEngine(op_context.engine))  # type: ignore[arg-type]
    path = short_tmp / "broken.sock"
    await nursery.start(ControlServer(ctx).serve_unix, path)
    async with await trio.open_unix_socket(str(path)) as stream:
        client = LineClient(stream)
        with caplog.at_level(logging.ERROR, logger="shadowblk.control"):
            reply = await client.request(op, **args)
        assert reply["error"]["code"] == code
        assert text in reply["error"]["message"]
        tracebacks = [r.exc_info[0] for r in caplog.records if r.exc_info]
        assert tracebacks == ([bug] if bug else [])  # a traceback for a bug only
        assert (await client.request("volume.list"))["ok"] is True
    assert type(error_from_reply(reply["error"])).code == code  # the client knows the code


async def test_events_reach_connected_clients(
    client: LineClient, control_server: ControlServer
) -> None:
    await client.result("status")  # the connection is registered by now
    control_server.broadcast_nowait("progress", {"done": 1})
    assert await client.receive() == {"event": "progress", "data": {"done": 1}}
    assert (await client.request("status"))["ok"] is True


async def test_a_client_that_never_reads_events_is_dropped(
    client: LineClient, control_server: ControlServer
) -> None:
    await client.result("status")
    (conn,) = control_server.connections
    pushed = 10000
    for _ in range(pushed):
        conn.push_event_nowait("tick", {"payload": "x" * 1000})
    received = 0
    while (line := await client.reader.readline()) is not None:
        assert json.loads(line)["event"] == "tick"
        received += 1
    assert received < pushed  # the connection ended: the client did not get them all
    await trio.testing.wait_all_tasks_blocked()
    assert not control_server.connections


async def test_a_reply_from_the_creation_thread_keeps_every_line_whole(
    client: LineClient, control_server: ControlServer
) -> None:
    """snapshot.create replies from the thread that created the snapshot (control.Wire).
    With the socket full of events the client has not read, the reply waits in the wire
    behind the event being written, and every line arrives whole, the reply once."""
    await client.result("volume.create", name="v", size=1 << 20)
    (conn,) = control_server.connections
    pushed = 20  # 2 MB, more than the socket buffers hold: an event is written in part
    for _ in range(pushed):
        conn.push_event_nowait("tick", {"payload": "x" * 100000})
    await trio.testing.wait_all_tasks_blocked()  # the writer waits for the socket now
    request = {"id": "c", "op": "snapshot.create", "args": {"volumes": ["v"]}}
    await client.send_line(json.dumps(request).encode())
    await trio.to_thread.run_sync(_wait_for_a_snapshot, control_server)  # replied while full
    events, replies = 0, []
    while len(replies) < 1 or events < pushed:
        message = await client.receive()  # json.loads: a torn line fails here
        if "event" in message:
            assert message["data"] == {"payload": "x" * 100000}
            events += 1
        else:
            replies.append(message)
    assert [r["id"] for r in replies] == ["c"]
    assert replies[0]["result"]["snapshots"][0]["name"] == "v@1"
    assert (await client.request("status"))["ok"] is True


async def test_a_thread_reply_left_in_the_wire_is_sent_by_the_writer(
    client: LineClient, control_server: ControlServer
) -> None:
    """The socket is full and the writer task idle when the creation thread's reply does not
    fit: the thread hands the rest to the writer, which sends it once the client reads."""
    await client.result("volume.create", name="v", size=1 << 20)
    (conn,) = control_server.connections
    event = protocol.encode(protocol.event("tick", {"payload": "x" * 100000}))
    sent = 1
    while conn._wire.send(event):  # as the writer task would, until the socket is full
        sent += 1
    request = {"id": "c", "op": "snapshot.create", "args": {"volumes": ["v"]}}
    await client.send_line(json.dumps(request).encode())
    await trio.to_thread.run_sync(_wait_for_a_snapshot, control_server)
    with trio.fail_after(30):  # a liveness bound: nothing else would wake the writer
        for _ in range(sent):
            assert (await client.receive())["event"] == "tick"
        reply = await client.receive()
    assert reply["id"] == "c" and reply["ok"] is True


async def test_pipelined_creates_are_answered_in_order_and_errors_mapped(
    client: LineClient,
) -> None:
    """snapshot.create runs in a thread of its own (OpContext.call_now): the connection
    still waits for it before the next request, and its errors reach the reply."""
    await client.result("volume.create", name="v", size=1 << 20)
    lines = [
        {"id": 1, "op": "snapshot.create", "args": {"volumes": ["v"]}},
        {"id": 2, "op": "snapshot.list", "args": {"volume": "v"}},
        {"id": 3, "op": "snapshot.create", "args": {"volumes": ["nosuch"]}},
        {"id": 4, "op": "snapshot.create", "args": {"volumes": ["v"], "label": "b"}},
        {"id": 5, "op": "snapshot.list", "args": {"volume": "v"}},
    ]
    await client.send_line(b"\n".join(json.dumps(line).encode() for line in lines))
    with trio.fail_after(30):  # a liveness bound: a lost reply fails here
        replies = [await client.receive() for _ in lines]
    assert [r["id"] for r in replies] == [1, 2, 3, 4, 5]
    assert replies[0]["result"]["snapshots"][0]["name"] == "v@1"
    assert [s["name"] for s in replies[1]["result"]] == ["v@1"]
    assert replies[2]["ok"] is False and replies[2]["error"]["code"] == "not-found"
    assert replies[3]["result"]["snapshots"][0]["name"] == "v@2"
    assert [s["name"] for s in replies[4]["result"]] == ["v@1", "v@2"]


def _wait_for_a_snapshot(server: ControlServer) -> None:
    """Until the server's engine has a snapshot of `v` (the creation thread's reply has
    been sent then, or left in the wire)."""
    deadline = time.monotonic() + 30
    while not server.ctx.engine.snapshots("v"):
        assert time.monotonic() < deadline, "snapshot.create never ran"
        time.sleep(0.01)


async def test_a_client_gone_before_its_reply_from_a_thread_harms_nobody(
    control_server: ControlServer,
    control_path: Path,
    client: LineClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await client.result("status")  # registered: the one connection left at the end
    with caplog.at_level(logging.ERROR, logger="shadowblk.control"):
        async with await trio.open_unix_socket(str(control_path)) as stream:
            await LineClient(stream).result("volume.create", name="v", size=1 << 20)
            line = json.dumps({"id": 1, "op": "snapshot.create", "args": {"volumes": ["v"]}})
            await stream.send_all(line.encode() + b"\n")
        # its reply went to a closed socket; then the connection ended
        await trio.to_thread.run_sync(_wait_for_connections, control_server, 1)
    assert [r.getMessage() for r in caplog.records] == []  # no error: EPIPE is goodbye
    assert [s["name"] for s in await client.result("snapshot.list")] == ["v@1"]


def _wait_for_connections(server: ControlServer, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(server.connections) != count:
        assert time.monotonic() < deadline, f"{len(server.connections)} connections stay"
        time.sleep(0.01)


async def test_socket_is_private(control_path: Path) -> None:
    mode = os.stat(control_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


async def test_socket_is_removed_when_the_server_stops(
    op_context: OpContext, short_tmp: Path
) -> None:
    path = short_tmp / "c.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(op_context).serve_unix, path)
        assert path.exists()
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_stale_socket_is_replaced(op_context: OpContext, short_tmp: Path) -> None:
    path = short_tmp / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # bound, never listening, owner gone: connections are refused
    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(op_context).serve_unix, path)
        async with await trio.open_unix_socket(str(path)) as stream:
            assert (await LineClient(stream).request("status"))["ok"] is True
        nursery.cancel_scope.cancel()


async def test_live_socket_and_other_files_are_not_replaced(
    control_path: Path, short_tmp: Path
) -> None:
    with pytest.raises(Locked):
        await remove_stale_socket(control_path)
    regular = short_tmp / "file"
    regular.write_text("keep me")
    with pytest.raises(InvalidArgument):
        await remove_stale_socket(regular)
    assert regular.read_text() == "keep me"


def test_every_op_has_a_handler_and_a_schema() -> None:
    assert set(HANDLERS) == set(protocol.OPS)


async def test_a_delete_that_fails_midway_says_what_it_deleted(
    client: LineClient, op_context: OpContext
) -> None:
    await client.result("volume.create", name="vol0", size=1 << 20, sparse=True)
    for _ in range(2):
        await client.result("snapshot.create", volumes=["vol0"])
    device = op_context.engine.open_export("vol0@2")  # pinned: delete refuses it
    try:
        reply = await client.request("snapshot.delete", names=["vol0@1", "vol0@2"])
    finally:
        device.close()
    assert reply["error"]["code"] == "busy"
    assert reply["error"]["message"].startswith("deleted vol0@1, then vol0@2: ")
    assert [s["name"] for s in await client.result("snapshot.list")] == ["vol0@2"]
