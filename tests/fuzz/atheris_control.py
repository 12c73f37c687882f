"""An atheris (libFuzzer) harness for the control socket's request validation, run by hand:
`make fuzz`, or `.venv/bin/python tests/fuzz/atheris_control.py -runs=100000 DIR`.

Design notes
------------
The entry points are those `control.Connection.answer` calls before it dispatches, in its
order: `protocol.decode_line`, `protocol.request_id`, `protocol.validate_request`, then
`protocol.encode` of the reply. The input is split into lines as the connection splits
them. The first byte picks the shape of the input:
- even: the rest, raw, as request lines;
- odd: one request of a known operation (chosen by the next byte) whose arguments, picked
  by a mask byte from the operation's schema (plus one unknown key now and then), are JSON
  fragments of the bytes that follow (a fragment that is not JSON is used as a string).
  This reaches the type checks of every argument far more often than raw JSON would.

A finding is any exception out of `TestOneInput`: validation raising anything but the
documented `InvalidArgument`, a validated request that breaks its schema (an unknown or
missing argument, a value its type refuses) or carries a string that is not text (a lone
surrogate from a JSON escape: the engine failed on it with `internal`), or a reply that
does not encode as one line of JSON. Without atheris installed the module still imports
(tests/fuzz/test_harnesses.py). tests/fuzz/control.dict gives libFuzzer JSON tokens and the
names of the operations and arguments.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import fuzzmain

try:
    import atheris  # type: ignore[import-not-found]
except ImportError:  # the harness still runs under pytest, uninstrumented
    atheris = None


def instrumented() -> contextlib.AbstractContextManager[Any]:
    """Coverage instrumentation of shadowblk's modules, imported within."""
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["shadowblk"])


with instrumented():
    from shadowblk.provider.errors import InvalidArgument
    from shadowblk.tools import protocol

OP_NAMES = sorted(protocol.OPS)
SEEDS = [
    b'\x00{"id": 1, "op": "status"}\n{"id": "x", "op": "snapshot.create", "args": {}}',
    b"\x01\x0c\xff" + b"\x02[1]\x03abc\x04true\x01",
    b'\x00{"id": 2, "op": "volume.create", "args": {"name": "v", "size": 4096, "x": 1}}',
]


def answer(line: bytes) -> dict[str, Any]:
    """The reply `Connection.answer` would give, short of running the operation."""
    rid = None
    try:
        message = protocol.decode_line(line)
        rid = protocol.request_id(message)
        request = protocol.validate_request(message)
    except InvalidArgument as exc:
        return protocol.reply_error(rid, exc.code, exc.message)
    check_request(request)
    return protocol.reply_ok(rid, {"op": request.op})


def check_request(request: protocol.Request) -> None:
    """A request that passed validation keeps its operation's schema, and its strings are
    text the engine can store and use as paths (UTF-8: no lone surrogates)."""
    json.dumps([request.id, request.args], ensure_ascii=False).encode("utf-8")
    schema = protocol.OPS[request.op]
    assert set(request.args) <= set(schema), request
    for key, arg in schema.items():
        assert key in request.args or not arg.required, (request, key)
        assert key not in request.args or arg.type.check(request.args[key]), (request, key)


def check_reply(reply: dict[str, Any]) -> None:
    """The reply goes out as one line of JSON that reads back."""
    line = protocol.encode(reply)
    assert line.endswith(b"\n") and line.count(b"\n") == 1, line
    assert json.loads(line)["ok"] == reply["ok"]


def fragment(raw: bytes) -> Any:
    """A JSON value from fuzzer bytes: the bytes as JSON, or else as a string (bytes that
    are not UTF-8 become lone surrogates, which json.dumps sends as `\\udcXX` escapes)."""
    text = raw.decode("utf-8", "surrogateescape")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def structured_line(data: bytes) -> bytes:
    """One request of a known operation; arguments from the schema, values fuzzed."""
    op = OP_NAMES[data[0] % len(OP_NAMES)] if data else "status"
    mask = data[1] if len(data) > 1 else 0
    keys = [*protocol.OPS[op], "unknown"][:8]
    chosen = [key for bit, key in enumerate(keys) if mask >> bit & 1]
    args, pos = {}, 2
    for key in chosen:
        size = data[pos] if pos < len(data) else 0
        args[key] = fragment(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return json.dumps({"id": pos, "op": op, "args": args}).encode()


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    if not data:
        return
    lines = data[1:].split(b"\n") if data[0] % 2 == 0 else [structured_line(data[1:])]
    for line in lines:
        if line.strip():  # the connection skips blank lines
            check_reply(answer(line))


def main() -> None:
    fuzzmain.run(atheris, SEEDS, TestOneInput)


if __name__ == "__main__":
    main()
