"""The blocking client: error replies become the engine's own exception classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowblk.provider import errors
from shadowblk.tools.client import ControlClient, error_from_reply


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("not-found", errors.NotFound),
        ("invalid-argument", errors.InvalidArgument),
        ("busy", errors.Busy),
        ("locked", errors.Locked),
        ("internal", errors.ShadowblkError),
    ],
)
def test_error_codes_map_to_classes(code: str, cls: type[errors.ShadowblkError]) -> None:
    exc = error_from_reply({"code": code, "message": "m"})
    assert type(exc) is cls
    assert (exc.code, exc.message) == (code, "m")


def test_an_unknown_code_is_kept() -> None:
    exc = error_from_reply({"code": "writer-timeout", "message": "slow"})
    assert (exc.code, exc.message, exc.exit_code) == ("writer-timeout", "slow", 1)


def test_no_socket_means_no_service(short_tmp: Path) -> None:
    with pytest.raises(errors.ServiceUnavailable) as info:
        ControlClient.connect(short_tmp)
    assert info.value.exit_code == 3
