"""The Litestar application: routes, dependencies and the services' lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import MediaType
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from app.api import AgentsController, EventsController, exception_handlers, health
from app.api.audit import AuditController
from app.api.bodies import JsonRequest
from app.api.content import ContentController
from app.api.dashboard import dashboard_routes
from app.api.deps import provide_services
from app.api.direct import DirectAppends
from app.api.errors import ErrorDocumentingJsonPlugin
from app.api.ingest import IngestController, IngestsController
from app.api.limits import SseConnections, drain_refused_bodies, limit_sse_connections
from app.api.metrics import metrics
from app.api.security import AccessPolicy, build_cors_config, require_access
from app.api.shutdown import ShutdownSignal
from app.api.stats import StatsController
from app.config import Settings, get_settings
from app.observability import configure_logging, track_requests
from app.runtime.heap import settled_heap
from app.runtime.services import open_services

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()
    configure_logging(settings.server.log_format)
    access = AccessPolicy(settings.security)
    sse_connections = SseConnections(settings.limits.sse_max_connections)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        shutdown = ShutdownSignal()
        app.state.draining = shutdown.draining
        async with open_services(settings) as services:
            app.state.services = services
            shutdown.install()
            try:
                with settled_heap():
                    yield
            finally:
                shutdown.uninstall()

    app = Litestar(
        route_handlers=[
            EventsController,
            AgentsController,
            IngestController,
            IngestsController,
            StatsController,
            ContentController,
            AuditController,
            health,
            metrics,
            *dashboard_routes(),
        ],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers=exception_handlers,
        request_class=JsonRequest,
        middleware=[
            DefineMiddleware(require_access, policy=access),
            DefineMiddleware(limit_sse_connections, connections=sse_connections),
        ],
        cors_config=build_cors_config(settings.security),
        request_max_body_size=settings.limits.max_body_bytes,
        state=State({"access_policy": access, "sse_connections": sse_connections}),
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Activity service",
            version="1",
            path="/schema",
            # The document itself at /schema (and /schema/openapi.json); no UI that needs a CDN.
            render_plugins=[
                ErrorDocumentingJsonPlugin(path=["/", "/openapi.json"], media_type=MediaType.JSON)
            ],
        ),
        logging_config=None,
    )
    router = app.asgi_handler
    if settings.server.direct_appends:
        router = app.state.direct_appends = DirectAppends(app, router, settings, access)
    # Outermost, so that every response (a 404 too) carries its request id.
    app.asgi_handler = track_requests(drain_refused_bodies(router))  # type: ignore[arg-type,assignment]
    return app
