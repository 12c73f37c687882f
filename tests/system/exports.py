"""Reading and writing a service's exports over NBD, for the system tests."""

from __future__ import annotations

import hashlib
import subprocess
from typing import Any

import nbd


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
