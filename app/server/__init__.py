"""How the service is served: the HTTP server's connection handling
(:mod:`app.server.connections`)."""

from __future__ import annotations

__all__ = ["CONNECTION_EXTENSION"]

#: The ASGI scope extension a connection offers its application: ``abort`` closes it at
#: once, unsent bytes dropped; ``guard`` is the process's connection guard (for /metrics).
CONNECTION_EXTENSION = "activity.connection"
