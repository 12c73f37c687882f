"""The built-in NBD server (trio): exports `VOLUME` (read-write) and `VOLUME@N` (read-only).

Use `NBDServer(registry).serve_unix(path)` and, for TCP, `.serve_tcp(host, port, tls=...)`
(tls.server_context builds the SSL context); see server.py for the design notes and
docs/nbd.md for what is served.
"""

from .server import NBDServer

__all__ = ["NBDServer"]
