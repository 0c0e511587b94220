"""``GET /metrics``: the Prometheus text exposition format (version 0.0.4).

Written out here rather than with ``prometheus_client``: every figure already lives on the
objects that produce it (the store's append counters, the feed's subscriptions, the SSE cap,
the job runner, the projections' tables), so rendering them on each scrape is a page of code,
and it avoids a process-wide registry that several apps in one process (the tests) would share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get
from litestar.datastructures import State
from sqlalchemy import func, select

from app.api.deps import ServicesDep
from app.api.direct import DirectAppends
from app.api.limits import SseConnections
from app.observability import Histogram
from app.projections.agents import agent_activities
from app.projections.ingests import ingests
from app.runtime.services import Services
from app.server import CONNECTION_EXTENSION

if TYPE_CHECKING:
    from app.server.connections import ConnectionGuard

__all__ = ["metrics"]

# Litestar adds "; charset=utf-8" to a text type.
CONTENT_TYPE = "text/plain; version=0.0.4"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escaped = (
        f'{key}="{value.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for key, value in labels.items()
    )
    return "{" + ",".join(escaped) + "}"


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[dict[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for bound, count in histogram.cumulative():
            self.lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {count}')
        self.lines.append(f"{name}_sum {_number(histogram.total)}")
        self.lines.append(f"{name}_count {histogram.count}")

    def render(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


async def _count_by_status(services: Services) -> tuple[dict[str, int], dict[str, int]]:
    async with services.engine.connect() as connection:
        by_ingest = {
            str(status): int(count)
            for status, count in await connection.execute(
                select(ingests.c.status, func.count()).group_by(ingests.c.status)
            )
        }
        by_agent = {
            str(status): int(count)
            for status, count in await connection.execute(
                select(agent_activities.c.status, func.count()).group_by(agent_activities.c.status)
            )
        }
    return by_ingest, by_agent


@get(
    "/metrics",
    summary="Metrics in the Prometheus text format",
    tags=["service"],
    media_type=CONTENT_TYPE,
)
async def metrics(
    services: ServicesDep, state: State, request: Request[Any, Any, Any]
) -> Response[bytes]:
    store, feed = services.store, services.store.feed
    appends = store.metrics
    out = _Exposition()
    out.family(
        "activity_append_requests_total",
        "counter",
        "Append requests by outcome (ok; conflict: refused, nothing written; unavailable: 503).",
        (({"outcome": outcome}, count) for outcome, count in appends.requests.items()),
    )
    out.family(
        "activity_appended_events_total",
        "counter",
        "Events written to the log.",
        [({}, appends.events)],
    )
    out.family(
        "activity_append_transactions_total",
        "counter",
        "Group-committed transactions by outcome.",
        [
            ({"outcome": "committed"}, appends.transactions),
            ({"outcome": "failed"}, appends.failed_transactions),
        ],
    )
    out.histogram(
        "activity_append_latency_seconds",
        "From an append's arrival to its durable acknowledgement (group-commit wait + write).",
        appends.latency,
    )
    out.histogram(
        "activity_append_commit_seconds",
        "One group-committed transaction: write and fsync.",
        appends.commit_seconds,
    )
    out.histogram(
        "activity_append_batch_events",
        "Events per group-committed transaction.",
        appends.batch_events,
    )
    out.family("activity_log_head", "gauge", "The newest committed position.", [({}, feed.head)])
    out.family(
        "activity_feed_notified_events_total",
        "counter",
        "Other instances' events taken from their notifications, not read from the table.",
        [({}, store.notified_events)],
    )
    connections: SseConnections | None = state.get("sse_connections")
    if connections is not None:
        out.family(
            "activity_sse_connections",
            "gauge",
            "Open SSE connections on this instance.",
            [({}, connections.open)],
        )
        out.family(
            "activity_sse_connections_limit",
            "gauge",
            "SSE_MAX_CONNECTIONS.",
            [({}, connections.limit)],
        )
        out.family(
            "activity_sse_refused_total",
            "counter",
            "SSE requests refused with 503 at the connection limit.",
            [({}, connections.refused)],
        )
        out.family(
            "activity_sse_streams_total",
            "counter",
            "SSE streams by the transport that wrote them: lean (app/api/sse/lean.py) or "
            "task_group (SSE_LEAN_STREAMS=0).",
            [
                ({"transport": "lean"}, connections.transports["LeanSubscriber"]),
                ({"transport": "task_group"}, connections.transports["TaskGroupSubscriber"]),
            ],
        )
        out.family(
            "activity_sse_fanout_frames_total",
            "counter",
            "SSE event frames written to caught-up subscribers by the fan-out pass "
            "(app/api/sse/fanout.py; SSE_FANOUT=0: none), straight to their connections.",
            [({}, connections.fanout_frames)],
        )
        out.family(
            "activity_sse_fanout_deferred_total",
            "counter",
            "Batches the fan-out handed back to a subscriber's own task: its connection's "
            "buffer was full, or the frames larger than one write.",
            [({}, feed.fanout_refused)],
        )
    extensions: dict[str, Any] = request.scope.get("extensions") or {}
    guard: ConnectionGuard | None = (extensions.get(CONNECTION_EXTENSION) or {}).get("guard")
    if guard is not None:
        out.family(
            "activity_http_connections",
            "gauge",
            "Open HTTP connections of this process.",
            [({}, guard.open)],
        )
        out.family(
            "activity_http_connections_limit",
            "gauge",
            "The most HTTP connections this process holds (MAX_CONNECTIONS).",
            [({}, guard.max_connections)],
        )
        out.family(
            "activity_http_connections_closed_total",
            "counter",
            "Connections the server closed: a request head that did not arrive within "
            "REQUEST_HEADER_TIMEOUT_SECONDS, the oldest waiting one closed for a new one at "
            "the ceiling, a new one refused with 503 (every open one being answered).",
            [
                ({"reason": "header_timeout"}, guard.timed_out),
                ({"reason": "evicted"}, guard.evicted),
                ({"reason": "refused"}, guard.refused),
            ],
        )
    direct: DirectAppends | None = state.get("direct_appends")
    if direct is not None:
        out.family(
            "activity_http_appends_total",
            "counter",
            "Append requests by who answered them: direct (in front of the router, "
            "app/api/direct.py) or router (anything the direct path does not take).",
            [({"path": "direct"}, direct.answered), ({"path": "router"}, direct.handed_on)],
        )
    out.family(
        "activity_log_subscribers",
        "gauge",
        "Tails of the log on this instance (event and agent streams, ingest streams).",
        [({}, feed.subscribers)],
    )
    out.family(
        "activity_log_subscriber_lag_max",
        "gauge",
        "Positions between the head and the furthest-behind tail's last delivered event.",
        [({}, feed.max_lag())],
    )
    out.family(
        "activity_log_window_bytes",
        "gauge",
        "Estimated memory held by the in-process window of newest events.",
        [({}, feed.window_bytes)],
    )
    out.family(
        "activity_jobs_running_local",
        "gauge",
        "Jobs (ingests, agent runs) running on this instance.",
        [({}, services.jobs.running_count)],
    )
    by_ingest, by_agent = await _count_by_status(services)
    out.family(
        "activity_ingests",
        "gauge",
        "Ingests by status, from the ingests projection (pending and running are open jobs).",
        (({"status": status}, count) for status, count in sorted(by_ingest.items())),
    )
    out.family(
        "activity_agent_activities",
        "gauge",
        "Agent activities by stored status, from the agents projection.",
        (({"status": status}, count) for status, count in sorted(by_agent.items())),
    )
    head = await store.head()
    checkpoints = {
        name: await services.projections.checkpoint(name)
        for name in sorted(services.projections.projections)
    }
    out.family(
        "activity_projection_checkpoint",
        "gauge",
        "The log position each projection has applied.",
        (({"projection": name}, position) for name, position in checkpoints.items()),
    )
    out.family(
        "activity_projection_lag_events",
        "gauge",
        "Positions between the log's head and each projection's checkpoint.",
        (({"projection": name}, max(0, head - pos)) for name, pos in checkpoints.items()),
    )
    return Response(content=out.render(), media_type=CONTENT_TYPE)
