"""A hypothesis fuzzer for control requests against a real service: every request line gets
exactly one reply, a refusal carries one of the service's error codes (never `internal`),
and the connection and the service go on."""

from __future__ import annotations

import json
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowblk.provider import errors
from shadowblk.tools import protocol

# every code a ShadowblkError subclass may carry
CODES = {
    cls.code
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.ShadowblkError)
}
# fault.arm could arm a crash of this very test process; it has its own tests
OPS = sorted(set(protocol.OPS) - {"fault.arm"}) + ["no.such.op"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
NAMES = st.sampled_from(["v", "v@1", "v@2", "w", "", "v@x", "../v"])
# values of the right type (so requests get past validation into the handlers), mixed
# with anything at all
TYPED = {
    id(protocol.NAME): NAMES,
    id(protocol.TEXT): st.text(max_size=12),
    id(protocol.SIZE): st.integers(1, 2**44) | st.sampled_from([4096, 65536, 1 << 20]),
    id(protocol.COUNT): st.integers(1, 2**20),
    id(protocol.FLAG): st.booleans(),
    id(protocol.ABSPATH): st.sampled_from(["/nonexistent", "/tmp", "/dev/null", "/"]),
    id(protocol.POLICY): st.sampled_from(["delete-oldest", "invalidate", "fail-writes"]),
    id(protocol.NAMES): st.lists(NAMES, min_size=1, max_size=3),
    id(protocol.DIFF_LIMIT): st.integers(1, 2**40) | st.sampled_from(["10%", "100%", "0%"]),
}


def request_args(op: str) -> st.SearchStrategy[dict[str, Any]]:
    schema = protocol.OPS.get(op, {})
    fields = {
        name: st.one_of(*[TYPED.get(id(arg.type), JSON)] * 4, JSON) for name, arg in schema.items()
    }
    junk = st.dictionaries(st.text(max_size=6), JSON, max_size=1)
    return st.builds(
        lambda known, extra: {**extra, **known},
        st.fixed_dictionaries({}, optional=fields),
        st.one_of(*[st.just({})] * 4, junk),
    )


def exchange(service: Any, line: bytes) -> Any:
    """Send one line on a fresh connection; the one reply, decoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(service.control_socket))
        sock.sendall(line + b"\n")
        with sock.makefile("rb") as f:
            reply = f.readline()
    assert reply.endswith(b"\n"), f"no reply to {line[:80]!r}"
    return json.loads(reply)


def check(service: Any, what: Any, reply: Any) -> None:
    assert reply.get("ok") in (True, False), (what, reply)
    if not reply["ok"]:
        assert reply["error"]["code"] in CODES - {"internal"}, (what, reply)
    status = exchange(service, b'{"id": 0, "op": "status", "args": {}}')
    assert status["ok"], status  # the service goes on


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=st.sampled_from(OPS).flatmap(lambda op: st.tuples(st.just(op), request_args(op))))
def test_fuzzed_requests_get_one_clean_reply(service: Any, request: tuple[str, Any]) -> None:
    op, args = request
    if op == "volume.create":  # never allocate a large file up front
        args["sparse"] = True
    line = json.dumps({"id": 1, "op": op, "args": args}).encode()
    check(service, (op, args), exchange(service, line))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(line=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_lines_get_one_reply_each(service: Any, line: bytes) -> None:
    line = line.replace(b"\n", b" ")
    if not line.strip():
        return  # blank lines are skipped by the protocol
    check(service, line, exchange(service, line))
