"""The Litestar application: routes, dependencies and the services' lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.di import Provide
from litestar.enums import MediaType
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from app.api import AgentsController, EventsController, exception_handlers, health
from app.api.deps import provide_services
from app.api.ingest import IngestController, IngestsController
from app.services import open_services
from app.settings import Settings, get_settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_services(settings) as services:
            app.state.services = services
            yield

    return Litestar(
        route_handlers=[
            EventsController,
            AgentsController,
            IngestController,
            IngestsController,
            health,
        ],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers=exception_handlers,
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Activity service",
            version="1",
            path="/schema",
            # The document itself at /schema (and /schema/openapi.json); no UI that needs a CDN.
            render_plugins=[
                JsonRenderPlugin(path=["/", "/openapi.json"], media_type=MediaType.JSON)
            ],
        ),
        logging_config=None,
    )
