"""Request-scoped access to the running services, and shared parameter checks."""

from __future__ import annotations

from collections.abc import Sequence

from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ClientException

from app.eventlog import EventFilter
from app.runtime.services import Services

__all__ = ["MAX_FILTER_VALUES", "ServicesDep", "build_filter", "provide_services"]

MAX_FILTER_VALUES = 20
MAX_FILTER_LENGTH = 200


#: Handlers take ``services: ServicesDep``; it is provided app-wide from ``app.state``.
ServicesDep = NamedDependency[Services]


def provide_services(state: State) -> Services:
    services: Services = state.services
    return services


def _values(name: str, values: Sequence[str] | None) -> tuple[str, ...]:
    if not values:
        return ()
    if len(values) > MAX_FILTER_VALUES:
        raise ClientException(
            detail=f"at most {MAX_FILTER_VALUES} values of {name} may be given, got {len(values)}",
            extra={"field": name},
        )
    for value in values:
        if not value or len(value) > MAX_FILTER_LENGTH:
            raise ClientException(
                detail=f"each {name} must be 1-{MAX_FILTER_LENGTH} characters",
                extra={"field": name},
            )
    return tuple(dict.fromkeys(values))


def build_filter(
    *,
    stream: Sequence[str] | None = None,
    source_id: Sequence[str] | None = None,
    event: Sequence[str] | None = None,
    agent_name: Sequence[str] | None = None,
) -> EventFilter:
    return EventFilter(
        streams=_values("stream", stream),
        source_ids=_values("source_id", source_id),
        events=_values("event", event),
        agent_names=_values("agent_name", agent_name),
    )
