"""``/audit/checkpoints``: the signed checkpoints of the log's hash chain (docs/audit.md)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, get
from litestar.params import Parameter

from app.api.deps import ServicesDep
from app.audit.checkpoints import LoggedCheckpoint, read_checkpoints

__all__ = ["AuditController", "Checkpoints"]

_NO_KEY = "no checkpoints are written: AUDIT_SIGNING_KEY is not set"


class Checkpoints(msgspec.Struct):
    #: Whether this instance writes checkpoints (a signing key is configured).
    enabled: bool
    #: The signing key's public half (raw Ed25519, base64), when enabled.
    public_key: str | None
    #: The newest checkpoints in the log, newest first; each one, saved as it is, is what
    #: ``audit verify --checkpoint`` takes.
    checkpoints: list[LoggedCheckpoint]
    detail: str | None = None


class AuditController(Controller):
    path = "/audit"
    tags = ["log"]

    @get(
        "/checkpoints",
        summary="Signed checkpoints of the log's hash chain, newest first",
        description=(
            "Each checkpoint signs (Ed25519) the chain value at a position: an auditor who "
            "keeps one can later prove the history up to it was not rewritten, with "
            "`python -m app audit verify --checkpoint FILE --public-key KEY`."
        ),
    )
    async def list_checkpoints(
        self,
        services: ServicesDep,
        limit: Annotated[int, Parameter(ge=1, le=1000, description="at most this many")] = 100,
    ) -> Checkpoints:
        found = await read_checkpoints(services.engine, limit)
        writer = services.checkpoints
        if writer is None:
            return Checkpoints(enabled=False, public_key=None, checkpoints=found, detail=_NO_KEY)
        return Checkpoints(enabled=True, public_key=writer.public_key, checkpoints=found)
