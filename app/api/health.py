"""``/health``: do the log and the content store answer; how far are the projections."""

from __future__ import annotations

import logging
from typing import Any

from litestar import MediaType, Request, Response, get

from app.api.deps import ServicesDep
from app.api.security import may_read

__all__ = ["health"]

logger = logging.getLogger(__name__)


@get("/health", summary="Liveness of the log and its read models", tags=["service"])
async def health(
    services: ServicesDep, request: Request[Any, Any, Any]
) -> Response[dict[str, Any]]:
    checks: dict[str, Any] = {}
    healthy = True
    try:
        head = await services.store.head()
        checks["database"] = {"status": "ok", "head": head}
        checks["projections"] = {
            name: {"checkpoint": await services.projections.checkpoint(name)}
            for name in services.projections.projections
        }
    except Exception as exc:
        logger.warning("health check: database unavailable: %s", exc)
        healthy = False
        checks["database"] = {"status": "error", "detail": str(exc)}
    # After a failed append: is the log writable again (a lock released, space freed)?
    try:
        problem = await services.store.probe()
    except Exception as exc:
        problem = f"the event log could not be probed: {exc}"
    if problem is None:
        checks["appends"] = {"status": "ok"}
    else:
        healthy = False
        checks["appends"] = {"status": "error", "detail": problem}
    try:
        await services.content.health()
        checks["content_store"] = {"status": "ok", "url": services.content.url}
    except Exception as exc:
        logger.warning("health check: content store unavailable: %s", exc)
        healthy = False
        checks["content_store"] = {"status": "error", "detail": str(exc)}
    checks["subscribers"] = services.store.feed.subscribers
    checks["jobs_running"] = services.jobs.running_count
    status = "ok" if healthy else "unavailable"
    # Open to load balancers; the details only for those who may read the rest.
    body = {"status": status, **checks} if may_read(request) else {"status": status}
    return Response(body, status_code=200 if healthy else 503, media_type=MediaType.JSON)
