"""The built-in NBD server (trio): exports `VOLUME` (read-write) and `VOLUME@N` (read-only).

Use `NBDServer(registry).serve_unix(path)`; see server.py for the design notes.
"""

from .server import NBDServer

__all__ = ["NBDServer"]
