"""Server-owned jobs: who runs each (leases) and the runner that runs them."""

from __future__ import annotations

from app.jobs.leases import Leases, job_leases, new_instance_id
from app.jobs.runner import JobKind, JobRunner

__all__ = ["JobKind", "JobRunner", "Leases", "job_leases", "new_instance_id"]
