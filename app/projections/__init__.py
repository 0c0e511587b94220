"""Read models folded from the log, each with a checkpoint."""

from __future__ import annotations

from app.projections.agents import AgentProjection
from app.projections.base import Projection, checkpoints
from app.projections.ingests import IngestProjection
from app.projections.runner import ProjectionRunner, UnknownProjection
from app.projections.stats import StatsProjection

__all__ = [
    "AgentProjection",
    "IngestProjection",
    "Projection",
    "ProjectionRunner",
    "StatsProjection",
    "UnknownProjection",
    "all_projections",
    "checkpoints",
]


def all_projections() -> list[Projection]:
    return [AgentProjection(), IngestProjection(), StatsProjection()]
