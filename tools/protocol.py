"""The control protocol: message shapes and the one table of operations.

Transport: `<state>/control.sock` (mode 0600), UTF-8 JSON objects, one per line ("\\n").

    request  {"id": 7, "op": "snapshot.create", "args": {"volumes": ["vol0"]}}
    reply    {"id": 7, "ok": true, "result": ...}
             {"id": 7, "ok": false, "error": {"code": "not-found", "message": "..."}}
    event    {"event": "<name>", "data": {...}}           (service -> client, unsolicited)

`id` is an integer or a string chosen by the client and echoed in the reply (null when the
request was too broken to read one). `args` may be omitted when an operation takes none.
Requests on one connection are answered in order. A line longer than `MAX_LINE` bytes gets
an `invalid-argument` reply and the connection is closed; any other bad request gets its
error reply and the connection goes on.

Strings must be text: a request with a `\\udXXX` escape of a lone surrogate anywhere in it
is refused with `invalid-argument` (no path, name or catalog row can hold one).

`OPS` is the whole schema: operation -> argument -> (type, required). `validate_request`
checks a decoded message against it at run time; unknown keys and wrong types are refused
with `invalid-argument`. Checks that need the engine (does the volume exist? is the chunk
size a power of two?) are the engine's.
"""

from __future__ import annotations

import json
import os.path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shadowblk.provider.errors import InvalidArgument
from shadowblk.provider.volumes import FULL_POLICIES

MAX_LINE = 1 << 20


@dataclass(frozen=True)
class ArgType:
    """A JSON value check with the words an error message uses for it."""

    description: str
    check: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


NAME = ArgType("a non-empty string", lambda v: isinstance(v, str) and v != "")
TEXT = ArgType("a string", lambda v: isinstance(v, str))
SIZE = ArgType("a positive integer (bytes)", lambda v: _is_int(v) and v > 0)
COUNT = ArgType("a positive integer", lambda v: _is_int(v) and v > 0)
DIFF_LIMIT = ArgType(
    'a positive integer (bytes) or a percentage ("10%")',
    lambda v: (_is_int(v) and v > 0) or (isinstance(v, str) and v.endswith("%")),
)
FLAG = ArgType("true or false", lambda v: isinstance(v, bool))
ABSPATH = ArgType(
    "an absolute path", lambda v: isinstance(v, str) and os.path.isabs(v) and "\0" not in v
)
POLICY = ArgType(" or ".join(FULL_POLICIES), lambda v: v in FULL_POLICIES)
NAMES = ArgType(
    "a non-empty list of non-empty strings",
    lambda v: isinstance(v, list) and v != [] and all(NAME.check(x) for x in v),
)


@dataclass(frozen=True)
class Arg:
    type: ArgType
    required: bool = False


OPS: dict[str, dict[str, Arg]] = {
    "status": {},
    "stats": {},
    "volume.create": {
        "name": Arg(NAME, required=True),
        "size": Arg(SIZE),
        "backing": Arg(ABSPATH),
        "chunk_size": Arg(SIZE),
        "diff_area": Arg(ABSPATH),
        "max_diff": Arg(DIFF_LIMIT),
        "full_policy": Arg(POLICY),
        "sparse": Arg(FLAG),
        "max_snapshots": Arg(COUNT),
    },
    "volume.set": {
        "name": Arg(NAME, required=True),
        "max_diff": Arg(DIFF_LIMIT),
        "no_max_diff": Arg(FLAG),
        "full_policy": Arg(POLICY),
        "max_snapshots": Arg(COUNT),
    },
    "volume.list": {},
    "volume.remove": {"name": Arg(NAME, required=True)},
    "snapshot.create": {
        "volumes": Arg(NAMES, required=True),
        "label": Arg(TEXT),
        "auto_release": Arg(FLAG),
    },
    "snapshot.list": {"volume": Arg(NAME)},
    "mount.prepare": {"snapshot": Arg(NAME, required=True), "recover": Arg(FLAG)},
    "mount.release": {"file": Arg(ABSPATH, required=True)},
    "verify": {"name": Arg(NAME), "progress": Arg(FLAG)},
    "fault.arm": {"spec": Arg(TEXT, required=True)},
    "volume.revert": {"snapshot": Arg(NAME, required=True), "force": Arg(FLAG)},
    # exactly one of the three: checked by the operation
    "snapshot.delete": {
        "names": Arg(NAMES),
        "set": Arg(NAME),
        "oldest": Arg(NAME),
        "force": Arg(FLAG),
    },
}

REQUEST_KEYS = frozenset({"id", "op", "args"})


@dataclass(frozen=True)
class Request:
    id: int | str
    op: str
    args: dict[str, Any]


def decode_line(line: bytes) -> Any:
    """The JSON value of one line; InvalidArgument when it is not JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"malformed request: not a JSON line ({exc})") from None


def request_id(message: Any) -> int | str | None:
    """The id to echo, when `message` carries a usable one."""
    if isinstance(message, dict):
        rid = message.get("id")
        if _is_int(rid) or isinstance(rid, str):
            return rid
    return None


def validate_request(message: Any) -> Request:
    """A checked `Request`, or InvalidArgument naming what is wrong."""
    if not isinstance(message, dict):
        raise InvalidArgument("malformed request: expected a JSON object")
    _check_text(message)
    unknown = sorted(set(message) - REQUEST_KEYS)
    if unknown:
        raise InvalidArgument(f"unknown request key(s): {', '.join(unknown)}")
    rid = request_id(message)
    if rid is None:
        raise InvalidArgument('request needs an "id": an integer or a string')
    op = message.get("op")
    if not isinstance(op, str):
        raise InvalidArgument('request needs an "op": a string')
    if op not in OPS:
        raise InvalidArgument(f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise InvalidArgument(f'{op}: "args" must be a JSON object')
    validate_args(op, args)
    return Request(rid, op, args)


def _check_text(message: dict[str, Any]) -> None:
    """Every string (key or value) is text. JSON can escape a lone surrogate ("\\ud800"),
    which UTF-8 cannot encode: the engine failed on one in a path with an internal error."""
    try:
        json.dumps(message, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(
            "malformed request: a string holds a lone surrogate (a \\ud800-\\udfff escape)"
        ) from None
    except RecursionError:  # the decoder let it through a few frames higher up the stack
        raise InvalidArgument("malformed request: nested too deeply") from None


def validate_args(op: str, args: dict[str, Any]) -> None:
    schema = OPS[op]
    unknown = sorted(set(args) - set(schema))
    if unknown:
        allowed = ", ".join(sorted(schema)) or "none"
        names = ", ".join(unknown)
        raise InvalidArgument(f"{op}: unknown argument(s) {names} (allowed: {allowed})")
    for key, arg in schema.items():
        if key not in args:
            if arg.required:
                raise InvalidArgument(f"{op}: missing argument {key!r}")
        elif not arg.type.check(args[key]):
            raise InvalidArgument(f"{op}: argument {key!r} must be {arg.type.description}")


def encode(message: dict[str, Any]) -> bytes:
    """One line of JSON (values JSON cannot carry are written as strings)."""
    return json.dumps(message, separators=(",", ":"), default=str).encode("utf-8") + b"\n"


def reply_ok(rid: int | str | None, result: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def reply_error(rid: int | str | None, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"event": name, "data": data}
