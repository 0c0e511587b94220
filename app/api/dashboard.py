"""``GET /``: the dashboard, a static page and its script and styles, served by the service
itself (no CDN, no build step)."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.datastructures import CacheControlHeader
from litestar.enums import MediaType
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

__all__ = ["WEB_DIR", "dashboard_routes"]

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Everything the page loads comes from this origin; nothing inline.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@get("/", include_in_schema=False, sync_to_thread=False)
def dashboard() -> Response[bytes]:
    return Response(
        content=(WEB_DIR / "index.html").read_bytes(),
        media_type=MediaType.HTML,
        headers=_SECURITY_HEADERS,
    )


def dashboard_routes() -> list[ControllerRouterHandler]:
    """The page at ``/`` and its assets under ``/web/``."""
    assets = create_static_files_router(
        path="/web",
        directories=[WEB_DIR],
        name="web",
        cache_control=CacheControlHeader(no_cache=True),
        include_in_schema=False,
    )
    return [dashboard, assets]
