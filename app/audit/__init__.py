"""The log's audit trail: recomputing its hash chain, and signed checkpoints of it."""

from __future__ import annotations
