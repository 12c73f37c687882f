"""Reading and writing a service's exports over NBD, for the system tests."""

from __future__ import annotations

import hashlib
import subprocess
import time
from typing import Any

import nbd

from shadowblk.tools.client import ControlClient

SETTLE_LIMIT = 60.0  # seconds: a liveness bound, not a timing assertion


def connect(service: Any, export: str) -> nbd.NBD:
    """A libnbd handle on `export` of a running `ServiceProcess`."""
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///{export}?socket={service.nbd_socket}")
    return h


def export_sha256(service: Any, export: str) -> str:
    """The export's sha256, read over NBD with nbdcopy (not through the FUSE file)."""
    uri = f"nbd+unix:///{export}?socket={service.nbd_socket}"
    proc = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, check=True, timeout=300)
    return hashlib.sha256(proc.stdout).hexdigest()


def wait_preserves_applied(service: Any, volume: str) -> None:
    """Poll `stats` until no preserve of `volume` is pending: its overlays' write-backs
    have run (a FLUSH need not wait for them when the journal holds their writes)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    with ControlClient.connect(service.state_dir) as client:
        while client.call("stats")["engine"]["volumes"][volume]["pending"]:
            assert time.monotonic() < deadline, f"the preserves of {volume} never finished"
            time.sleep(0.05)
