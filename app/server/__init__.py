"""How the service is served: the HTTP server's connection handling
(:mod:`app.server.connections`), and a response body's chunks written straight to its
connection (:mod:`app.server.chunks`)."""

from __future__ import annotations

__all__ = ["CONNECTION_EXTENSION"]

#: The ASGI scope extension a connection offers its application: ``abort`` closes it at
#: once, unsent bytes dropped; ``guard`` is the process's connection guard (for /metrics);
#: ``chunks(scope)`` gives a :class:`~app.server.chunks.ChunkWriter` for the response to
#: ``scope``, or None.
CONNECTION_EXTENSION = "activity.connection"
