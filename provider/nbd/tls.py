"""TLS for the TCP listener: the server's SSL context, and the plain-text policy.

Policy: NBD travels in plain text only over the Unix socket and loopback TCP. A TCP
listener on any other address needs TLS, and a listener with TLS requires it of every
client (FORCEDTLS, handshake.py). Client certificates are not asked for: TLS here protects
the data in transit and authenticates the server to its clients.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl

from ..errors import InvalidArgument


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """An SSL context for the server side (TLS 1.2 or later) with its certificate chain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
    except (OSError, ssl.SSLError) as exc:
        what = f"TLS certificate {os.fspath(cert)} with key {os.fspath(key)}"
        raise InvalidArgument(f"{what}: {exc.strerror or exc}") from None
    return context


def is_loopback(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address."""
    if not host:
        return False  # every interface
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidArgument(f"cannot resolve NBD listen address {host!r}: {exc}") from None
    addresses = {info[4][0] for info in infos}
    return all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_listen_address(host: str, port: int, *, tls: bool) -> None:
    """Refuse plain-text NBD on an address that is not loopback (InvalidArgument)."""
    if tls or is_loopback(host):
        return
    raise InvalidArgument(
        f"refusing plain-text NBD on {host or '*'}:{port}, which is not a loopback address: "
        "give --tls-cert and --tls-key, or listen on 127.0.0.1 or ::1"
    )
