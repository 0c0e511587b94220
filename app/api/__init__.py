"""Thin HTTP controllers and SSE framing over the log, projections and jobs."""

from __future__ import annotations

from app.api.agents import AgentsController
from app.api.errors import exception_handlers
from app.api.events import EventsController
from app.api.health import health

__all__ = ["AgentsController", "EventsController", "exception_handlers", "health"]
