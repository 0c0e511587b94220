"""What the running service tells its operators: logs, request ids, metric histograms."""

from __future__ import annotations

from app.observability.histogram import Histogram
from app.observability.logs import (
    configure_logging,
    ingest_id_var,
    log_context,
    request_id_var,
    scrub_query,
)
from app.observability.requests import next_request_id, track_requests

__all__ = [
    "Histogram",
    "configure_logging",
    "ingest_id_var",
    "log_context",
    "next_request_id",
    "request_id_var",
    "scrub_query",
    "track_requests",
]
